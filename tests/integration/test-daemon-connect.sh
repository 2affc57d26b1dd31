#!/bin/sh
# test-daemon-connect.sh: dsparkd while its database does not answer. The DSN points at a server that
# accepts TCP connections and never replies (a PostgreSQL host that hangs, or a firewall that holds
# the connection). dsparkd's loop goes on meanwhile: its metrics endpoint answers at once (database
# down), each attempt gives up after the DSN's connect_timeout and is retried, saying why, systemd's
# start timeout is extended, and SIGTERM stops dsparkd at once; meanwhile dsparkd sleeps in poll()
# rather than spinning. Then, against a
# private PostgreSQL behind a proxy that passes the first connection and holds the next ones: dsparkd
# connects, and while its notification probe's own connection hangs, the loop goes on too. Then, a
# probe whose connection takes longer than the probe's 10 s still goes, and dsparkd becomes ready. Behind
# a proxy that completes the login and then holds the queries, each attempt fails after statement_timeout
# + 10 s and is made again. Directly to the server: a worker never ready past worker.start_timeout does not
# make dsparkd spin; a statement held by a lock does not keep the other passes from their turns. Last,
# dsparkd's own server process is stopped after connecting (SIGSTOP: the kernel still takes the bytes,
# nothing answers, as with a hung server or a pooler that holds queries): the loop goes on while a
# statement waits, the connection is given up after statement_timeout + 10 s and made again, and
# SIGTERM does not wait for a statement that hangs.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/pg-harness.sh"

DSPARKD="$DS_BUILDDIR/dsparkd"
RECV="$DS_BUILDDIR/tests/integration/test-daemon-notify-recv"
[ -x "$DSPARKD" ] || tap_skip_all "dsparkd not built"
[ -x "$RECV" ] || tap_skip_all "tests/integration/test-daemon-notify-recv not built"
have_python || tap_skip_all "python3 not found"

T=$(mktemp -d "${TMPDIR:-/tmp}/dspark-dc.XXXXXX")
DPID=
SPID=
BPIDS=
RPID=
cleanup() {
    [ -n "$DPID" ] && kill -KILL "$DPID" 2>/dev/null
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null
    [ -n "$SPID" ] && kill "$SPID" 2>/dev/null
    [ -n "$BPIDS" ] && kill -CONT $BPIDS 2>/dev/null
    if [ "$tap_failed" -gt 0 ] 2>/dev/null && [ -f "$T/dsparkd.log" ]; then
        echo "# dsparkd log:"
        sed 's/^/#   /' "$T/dsparkd.log" | tail -n 30
    fi
    rm -rf "$T"
    pg_harness_stop
}
trap cleanup EXIT

# count_lines FILE REGEX
count_lines() {
    grep -Ec -- "$2" "$1" 2>/dev/null || true
}
now_ms() {
    python3 -c 'import time; print(int(time.monotonic() * 1000))'
}

# the silent server: accepts, keeps every connection open, never sends a byte; one line per connection
python3 - "$T/silent.port" "$T/silent.log" <<'PYEOF' &
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(16)
open(sys.argv[1], "w").write("%d\n" % s.getsockname()[1])
held = []
while True:
    c, _ = s.accept()
    held.append(c)
    with open(sys.argv[2], "a") as f:
        f.write("accepted %d\n" % len(held))
PYEOF
SPID=$!
wait_for "$T/silent.port" '^[0-9]+$' 10 || { echo "Bail out! the silent server did not start"; exit 1; }
SPORT=$(cat "$T/silent.port")
MPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# start_dsparkd DSN [DEVICES [START_TIMEOUT]]: dsparkd in the background with that DSN, its metrics on
# $MPORT, its log in dsparkd.log; with DEVICES, a worker (one that fails: /bin/false) for each
write_conf() {
    printf '[metrics]\nlisten = 127.0.0.1:%s\n[database]\ndsn = "%s"\n[events]\nendpoint = ipc://%s/events.sock\n' \
        "$MPORT" "$1" "$T" >"$T/dspark.conf"
    printf "${DSPARKD_CONF_EXTRA:-}" >>"$T/dspark.conf"
    [ -n "${2:-}" ] && printf '[worker]\nprogram = /bin/false\ndevices = %s\nstart_timeout = %s\n' "$2" \
        "${3:-10min}" >>"$T/dspark.conf"
    return 0
}
start_dsparkd() {
    write_conf "$@"
    "$DSPARKD" --config "$T/dspark.conf" 2>"$T/dsparkd.log" &
    DPID=$!
}

# scrape PATH: the status line and the body of a GET to dsparkd's metrics endpoint, within 1 s
scrape() {
    python3 - "$MPORT" "$1" <<'PYEOF'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=1.0)
c.request("GET", sys.argv[2])
r = c.getresponse()
print(r.status)
sys.stdout.write(r.read().decode())
PYEOF
}

# five_scrapes: how many of five scrapes, 0.4 s apart, answered within 1 s each
five_scrapes() {
    _ok=0
    for _i in 1 2 3 4 5; do
        sleep 0.4
        [ "$(scrape /metrics 2>/dev/null | head -n 1)" = 200 ] && _ok=$((_ok + 1))
    done
    echo "$_ok"
}
# stop_proxy: the silent server or the proxy, stopped
stop_proxy() {
    kill "$SPID" 2>/dev/null
    SPID=
}
# stop_dsparkd: SIGTERM to dsparkd and wait; its exit status in rc, the time it took in took_ms
stop_dsparkd() {
    _t0=$(now_ms)
    kill -TERM "$DPID"
    wait "$DPID"
    rc=$?
    took_ms=$(($(now_ms) - _t0))
    DPID=
}

# (a stand-in for systemd's notification socket)
"$RECV" "$T/notify.sock" 60 >"$T/notify.out" 2>&1 &
RPID=$!
wait_for_socket() {
    _n=0
    while [ ! -S "$1" ] && [ $_n -lt 50 ]; do sleep 0.1; _n=$((_n + 1)); done
}
wait_for_socket "$T/notify.sock"
export NOTIFY_SOCKET="$T/notify.sock"
start_dsparkd "host=127.0.0.1 port=$SPORT dbname=dspark user=dspark connect_timeout=3" 0
unset NOTIFY_SOCKET
wait_for "$T/silent.log" '^accepted 1$' 10
tap_result $? "dsparkd connects to the server that does not answer"

# the metrics endpoint is served by the same loop that runs the connection attempt
sleep 0.3
t0=$(now_ms)
scrape /metrics >"$T/metrics.txt" 2>"$T/scrape.err"
t1=$(now_ms)
tap_is "$(head -n 1 "$T/metrics.txt")" 200 "GET /metrics answers while the attempt waits for the server ($((t1 - t0)) ms)"
tap_like "$(cat "$T/metrics.txt")" '^dspark_database_up 0$' "... and says the database is down"
tap_is "$(five_scrapes)" 5 "five more scrapes over the next 2 s all answer within 1 s each"
# tap_sleeps WHAT: dsparkd's CPU time (user + system, in clock ticks) over the next 1.5 s is at most a fifth
# of a second's
tap_sleeps() {
    _c0=$(awk '{ print $14 + $15 }' "/proc/$DPID/stat")
    sleep 1.5
    _c1=$(awk '{ print $14 + $15 }' "/proc/$DPID/stat")
    _hz=$(getconf CLK_TCK)
    tap_ok "$1: $((_c1 - _c0)) ticks of CPU in 1.5 s (at most $((_hz / 5)))" [ $((_c1 - _c0)) -le $((_hz / 5)) ]
}
n=$(count_lines "$T/silent.log" '^accepted')
wait_for "$T/silent.log" "^accepted $((n + 1))\$" 6
tap_sleeps "dsparkd (one worker configured) sleeps while an attempt waits"

# each attempt gives up after connect_timeout (3 s), says why, and is retried
wait_for "$T/dsparkd.log" "database unavailable, retrying: could not connect to the database: .*\"127.0.0.1\", port $SPORT.*timeout expired" 6
tap_result $? "the attempt gives up after the DSN's connect_timeout, and the log says why"
wait_for "$T/silent.log" '^accepted 2$' 5
tap_result $? "... then dsparkd tries again"
tap_like "$(cat "$T/notify.out")" 'EXTEND_TIMEOUT_USEC=[0-9]+' "systemd's start timeout is extended while the database is not there"
tap_like "$(cat "$T/notify.out")" 'STATUS=database unavailable: could not connect' "... and STATUS= says why dsparkd waits"

# SIGTERM in the middle of an attempt
n=$(count_lines "$T/silent.log" '^accepted')
wait_for "$T/silent.log" "^accepted $((n + 1))\$" 6
sleep 0.5
stop_dsparkd
tap_is "$rc" 0 "SIGTERM during an attempt: dsparkd exits 0"
tap_ok "... within 2 s ($took_ms ms; the attempt had 2.5 s left)" [ "$took_ms" -lt 2000 ]
stop_proxy

# ---- the probe's connection hangs ----
pg_harness_start
trap cleanup EXIT   # (pg_harness_start sets its own)
for f in "$DS_SRCDIR"/sql/[0-9]*.sql; do
    psql -X -q -v ON_ERROR_STOP=1 -1 -f "$f" >/dev/null 2>"$T/schema.err" ||
        { echo "Bail out! applying $f failed: $(cat "$T/schema.err")"; exit 1; }
done
# start_proxy LATER: a proxy to the server's socket that passes the first connection at once, and the
# later ones after LATER seconds ("hold": never; "login": every connection at once, but what the client
# sends after its login is dropped, as a pooler holds queries); its port in PPORT, a line per connection
# in proxy.log
start_proxy() {
    rm -f "$T/proxy.port" "$T/proxy.log"
    python3 - "$T/proxy.port" "$T/proxy.log" "$PGH_DIR/.s.PGSQL.5432" "$1" <<'PYEOF' &
import socket, sys, threading, time
def pump(a, b, logged_in=None):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            if logged_in is not None and logged_in.is_set():
                continue
            b.sendall(data)
    except OSError:
        pass
    for x in (a, b):
        try:
            x.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(16)
open(sys.argv[1], "w").write("%d\n" % s.getsockname()[1])
def log(what):
    with open(sys.argv[2], "a") as f:
        f.write(what + "\n")
def to_client(u, c, logged_in):
    while True:
        data = u.recv(65536)
        if not data:
            break
        if b"Z\x00\x00\x00\x05" in data:   # ReadyForQuery: the login is over
            logged_in.set()
        c.sendall(data)
def pass_on(c, n, delay):
    time.sleep(delay)
    u = socket.socket(socket.AF_UNIX)
    u.connect(sys.argv[3])
    if sys.argv[4] == "login":
        logged_in = threading.Event()
        threading.Thread(target=pump, args=(c, u, logged_in), daemon=True).start()
        threading.Thread(target=to_client, args=(u, c, logged_in), daemon=True).start()
    else:
        threading.Thread(target=pump, args=(c, u), daemon=True).start()
        threading.Thread(target=pump, args=(u, c), daemon=True).start()
    log("passed %d" % n)
held = []
n = 0
while True:
    c, _ = s.accept()
    n += 1
    if n > 1 and sys.argv[4] == "hold":
        held.append(c)
        log("held %d" % n)
    else:
        log("accepted %d" % n)
        delay = 0 if n == 1 or sys.argv[4] == "login" else float(sys.argv[4])
        threading.Thread(target=pass_on, args=(c, n, delay), daemon=True).start()
PYEOF
    SPID=$!
    wait_for "$T/proxy.port" '^[0-9]+$' 10 || { echo "Bail out! the proxy did not start"; exit 1; }
    PPORT=$(cat "$T/proxy.port")
}
start_proxy hold
start_dsparkd "host=127.0.0.1 port=$PPORT user=postgres dbname=dspark connect_timeout=3"
wait_for "$T/proxy.log" '^held 2$' 10
tap_result $? "through the proxy, dsparkd connects, and its notification probe's connection is held"
scrape /metrics >"$T/metrics2.txt" 2>"$T/scrape2.err"
tap_is "$(head -n 1 "$T/metrics2.txt")" 200 "GET /metrics answers while the probe's connection waits"
tap_like "$(cat "$T/metrics2.txt")" '^dspark_database_up 1$' "... and says the database is up"
tap_is "$(five_scrapes)" 5 "five more scrapes over the next 2 s all answer within 1 s each"
tap_like "$(cat "$T/dsparkd.log")" 'connected to the database' "... and dsparkd says it is connected"
wait_for "$T/dsparkd.log" "could not send the notification probe \(trying again in 10 s\): could not connect to the database: .*\"127.0.0.1\", port $PPORT.*timeout expired" 6
tap_result $? "the probe's connection gives up after connect_timeout, and the log says so"
stop_dsparkd
tap_is "$rc" 0 "SIGTERM: dsparkd exits 0"
tap_ok "... within 3 s ($took_ms ms)" [ "$took_ms" -lt 3000 ]
stop_proxy

# ---- the probe's connection takes 11 s, longer than the probe's own 10 s ----
start_proxy 11
start_dsparkd "host=127.0.0.1 port=$PPORT user=postgres dbname=dspark connect_timeout=20"
wait_for "$T/dsparkd.log" "the notification probe's connection has not been made in 10 s; waiting for it" 12
tap_result $? "a probe whose connection takes 11 s: after 10 s the log says it waits for it"
wait_for "$T/dsparkd.log" 'ready: 0 workers' 20
tap_result $? "... then it goes, comes back, and dsparkd becomes ready"
tap_is "$(count_lines "$T/proxy.log" '^accepted')" 2 "... with one connection for the probe, not one every 10 s"
stop_dsparkd
tap_is "$rc" 0 "SIGTERM: dsparkd exits 0"
stop_proxy

# ---- a pooler that completes the login and holds the queries ----
start_proxy login
DSPARKD_CONF_EXTRA='[dsparkd]\ndb_timeout = 1s\n'
start_dsparkd "host=127.0.0.1 port=$PPORT user=postgres dbname=dspark connect_timeout=3"
wait_for "$T/dsparkd.log" 'database unavailable, retrying: database session setup failed: no answer from the database within 11\.0 s' 14
tap_result $? "the login done and the session's first statement held: the attempt fails after db_timeout + 10 s, saying why"
wait_for "$T/proxy.log" '^accepted 2$' 3
tap_result $? "... and a new one is made"
stop_dsparkd
tap_is "$rc" 0 "SIGTERM: dsparkd exits 0"
tap_ok "... within 3 s ($took_ms ms)" [ "$took_ms" -lt 3000 ]
stop_proxy

# ---- dsparkd's server process stops answering ----
# backend_stop: SIGSTOP to the server process of dsparkd's own connection; its pid in BPID
backend_stop() {
    BPID=$(psql -X -Atc "SELECT pid FROM pg_stat_activity WHERE application_name = 'dsparkd'")
    [ -n "$BPID" ] && kill -STOP "$BPID" && BPIDS="$BPIDS $BPID"
}
DSPARKD_CONF_EXTRA='[dsparkd]\nstatus_interval = 200ms\ndb_timeout = 1s\n'
start_dsparkd "host=$PGH_DIR user=postgres dbname=dspark"
wait_for "$T/dsparkd.log" 'ready: 0 workers' 20
tap_result $? "directly to the server: dsparkd becomes ready"
stop_dsparkd
# a worker that never becomes ready, past worker.start_timeout (1 s) and the next extension of the start
# timeout that would have been due (10 s after the start): no more to extend, and the loop still sleeps
start_dsparkd "host=$PGH_DIR user=postgres dbname=dspark" 0 1s
wait_for "$T/dsparkd.log" 'worker .*(exited|failed)' 10
sleep 10.5
tap_sleeps "a worker never ready, past worker.start_timeout"
stop_dsparkd
start_dsparkd "host=$PGH_DIR user=postgres dbname=dspark"
wait_for "$T/dsparkd.log" 'ready: 0 workers' 20
# the queue counts' statement waits for a lock for its whole statement_timeout (1 s), again and again:
# the other passes still go in their turn (dspark.promote_due_jobs, once a second)
psql -X -q -c "ALTER SYSTEM SET track_functions = 'all'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
promotes() {
    psql -X -Atc "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = 'promote_due_jobs'"
}
psql -X -q -c "BEGIN" -c "LOCK TABLE dspark.job_stats IN ACCESS EXCLUSIVE MODE" -c "SELECT pg_sleep(6)" \
    -c "COMMIT" >/dev/null &
LPID=$!
sleep 0.5
p0=$(promotes)
sleep 5
p1=$(promotes)
wait "$LPID"
tap_ok "while the queue counts wait for a lock, the pass over delayed jobs still runs: $((p1 - p0)) times in 5 s" \
    [ $((p1 - p0)) -ge 3 ]
backend_stop
tap_ok "dsparkd's server process is stopped (pid $BPID)" [ -n "$BPID" ]
sleep 0.5   # (the next queue counts' read, every 200 ms, is sent and waits)
tap_is "$(five_scrapes)" 5 "while its statement waits, five scrapes over 2 s all answer within 1 s each"
scrape /metrics >"$T/metrics3.txt" 2>"$T/scrape3.err"
tap_like "$(cat "$T/metrics3.txt")" '^dspark_database_up 1$' "... and the database still counts as up"
wait_for "$T/dsparkd.log" 'no answer from the database within 11\.0 s \(statement_timeout 1\.0 s\); giving the connection up' 14
tap_result $? "after statement_timeout + 10 s without an answer, the connection is given up, and the log says so"
wait_for "$T/dsparkd.log" 'database connection restored' 5
tap_result $? "... and made again"
sleep 0.5
scrape /metrics >"$T/metrics4.txt" 2>"$T/scrape4.err"
tap_like "$(cat "$T/metrics4.txt")" '^dspark_database_up 1$' "... the database is up again"
backend_stop
sleep 0.5
stop_dsparkd
tap_is "$rc" 0 "SIGTERM while the new connection's statement waits: dsparkd exits 0"
tap_ok "... within 3 s ($took_ms ms)" [ "$took_ms" -lt 3000 ]
kill -CONT $BPIDS 2>/dev/null
BPIDS=

# retention turned off (0: keep for ever) by SIGHUP while a retention pass waits for its turn behind a
# statement held by a lock: the pass does not go
DSPARKD_CONF_EXTRA='[dsparkd]\nstatus_interval = 200ms\nretention = 1d\nretention_interval = 1s\n'
start_dsparkd "host=$PGH_DIR user=postgres dbname=dspark"
wait_for "$T/dsparkd.log" 'ready: 0 workers' 20
ids=$(psql -X -Atc "WITH x AS (INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'p' || g
                              FROM generate_series(1, 50) g RETURNING id) SELECT string_agg(id::text, ',') FROM x")
psql -X -Atc "SELECT count(*) FROM dspark.cancel_jobs('{$ids}')" >/dev/null
psql -X -q -c "BEGIN" -c "LOCK TABLE dspark.job_stats IN ACCESS EXCLUSIVE MODE" -c "SELECT pg_sleep(5)" \
    -c "COMMIT" >/dev/null &
LPID=$!
sleep 2.5
DSPARKD_CONF_EXTRA='[dsparkd]\nstatus_interval = 200ms\nretention = 0\nretention_interval = 1s\n'
write_conf "host=$PGH_DIR user=postgres dbname=dspark"
kill -HUP "$DPID"
wait "$LPID"
sleep 2
tap_is "$(psql -X -Atc "SELECT count(*) FROM dspark.jobs WHERE id IN ($ids)")" 50 \
    "retention turned off by SIGHUP while a pass waited: the 50 finished jobs are kept"
stop_dsparkd
tap_is "$rc" 0 "SIGTERM: dsparkd exits 0"

tap_done
