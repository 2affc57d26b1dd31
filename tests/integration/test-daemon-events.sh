#!/bin/sh
# test-daemon-events.sh: dsparkd against a private PostgreSQL with fake workers
# (tests/integration/fake-worker.sh) and real ZeroMQ subscribers
# (tests/integration/test-daemon-sub): every state change of a job arrives as an event
# with increasing versions, batch and job topics select what they should, a
# late subscriber learns the final state from the row, heartbeats, the lease
# reaper, the expiry of queued jobs past their deadline, delayed jobs that come
# due, worker restarts after a crash, a PostgreSQL restart, SIGHUP reloads,
# draining on SIGTERM, and refusal of a schema this build does not know.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/pg-harness.sh"

DSPARKD="$DS_BUILDDIR/dsparkd"
SUB="$DS_BUILDDIR/tests/integration/test-daemon-sub"
[ -x "$DSPARKD" ] || tap_skip_all "dsparkd not built"
[ -x "$SUB" ] || tap_skip_all "tests/integration/test-daemon-sub not built"

pg_harness_start
T=$(mktemp -d "${TMPDIR:-/tmp}/dspark-dd.XXXXXX")
DPID=
SUBPIDS=
cleanup() {
    [ -n "$DPID" ] && kill -KILL "$DPID" 2>/dev/null
    for p in $SUBPIDS; do kill "$p" 2>/dev/null; done
    for f in "$T"/w/*.pid; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null; done
    if [ "$tap_failed" -gt 0 ] 2>/dev/null && [ -f "$T/dsparkd.log" ]; then
        echo "# dsparkd log:"
        sed 's/^/#   /' "$T/dsparkd.log" | tail -n 60
    fi
    rm -rf "$T"
    pg_harness_stop
}
trap cleanup EXIT

for f in "$DS_SRCDIR"/sql/[0-9]*.sql; do
    psql -X -q -v ON_ERROR_STOP=1 -1 -f "$f" >/dev/null 2>"$T/schema.err" ||
        { echo "Bail out! applying $f failed: $(cat "$T/schema.err")"; exit 1; }
done

# start_sub OUTFILE ARGS...: a subscriber in the background, synced
start_sub() {
    _out=$1
    shift
    "$SUB" --endpoint "$EP" "$@" >"$_out" 2>&1 &
    SUBPIDS="$SUBPIDS $!"
    wait_for "$_out" '^(synced|nosync)' 10
}

mkdir -p "$T/w"
EP="ipc://$T/events.sock"
MPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# scrape [METHOD] PATH: the status code, then the body, of an HTTP request to dsparkd's metrics endpoint
# (on $MPORT, within $SCRAPE_TIMEOUT seconds, default 5)
scrape() {
    python3 - "$MPORT" "$@" <<'PYEOF'
import http.client, os, sys
port, args = int(sys.argv[1]), sys.argv[2:]
method, path = (args[0], args[1]) if len(args) > 1 else ("GET", args[0])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=float(os.environ.get("SCRAPE_TIMEOUT", "5")))
c.request(method, path)
r = c.getresponse()
print(r.status, r.getheader("Content-Type"))
if r.getheader("Allow"):
    print("Allow:", r.getheader("Allow"))
sys.stdout.write(r.read().decode())
PYEOF
}
cat >"$T/dspark.conf" <<EOF
[dsparkd]
host_name = testhost
status_interval = 200ms
reaper_interval = 1s
reaper_grace = 0s
log_level = debug

[database]
dsn = "$DSPARK_DSN"

[events]
endpoint = $EP
heartbeat_interval = 200ms

[metrics]
listen = 127.0.0.1:$MPORT

[worker]
program = $DS_SRCDIR/tests/integration/fake-worker.sh
devices = 0-1
target = "/models/target dir"
draft = /models/draft
max_batch = 64
args = --extra 'two words'
restart_delay = 200ms
EOF

FAKE_WORKER_DIR="$T/w" "$DSPARKD" --config "$T/dspark.conf" 2>"$T/dsparkd.log" &
DPID=$!
export FAKE_WORKER_DIR="$T/w"

wait_for "$T/dsparkd.log" 'ready: 2 workers' 15
tap_result $? "dsparkd starts two workers and becomes ready"

args0=$(tr '\n' ' ' <"$T/w/0.args" 2>/dev/null)
tap_is "$args0" "--device 0 --target /models/target dir --draft /models/draft --max-batch 64 --drain-timeout 60 --extra two words " \
    "worker arguments come from the configuration"
tap_is "$(sed -n 4p "$T/w/0.args" 2>/dev/null)" "/models/target dir" "a quoted value with a blank stays one argument"
tap_is "$(sed -n 1p "$T/w/1.args" 2>/dev/null)$(sed -n 2p "$T/w/1.args" 2>/dev/null)" "--device1" "second worker on device 1"
env0=$(cat "$T/w/0.env" 2>/dev/null)
tap_like "$env0" "^DSPARK_READY_FD=3$" "worker gets DSPARK_READY_FD=3"
tap_like "$env0" "^DSPARK_WORKER_ID=testhost/0$" "worker gets DSPARK_WORKER_ID"
tap_like "$env0" "^DSPARK_DSN=host=" "worker gets the DSN in its environment, not argv"
tap_is "$(grep -c '^NOTIFY_SOCKET\|^WATCHDOG_' "$T/w/0.env")" "0" "worker does not inherit NOTIFY_SOCKET or WATCHDOG_*"
# the worker's descriptors, seen from outside: stdin/stdout/stderr, the ready
# pipe on fd 3, the script the shell reads, and copies of those the shell makes
ls -l "/proc/$(cat "$T/w/0.pid")/fd" 2>/dev/null | sed -n 's/.* \([0-9][0-9]*\) -> \(.*\)$/\1 \2/p' >"$T/fds"
tap_like "$(cat "$T/fds")" '^3 pipe:' "fd 3 of the worker is the ready pipe"
tap_is "$(sed -n 's/^0 //p' "$T/fds")" "/dev/null" "the worker's stdin is /dev/null"
allowed=$(sed -n 's/^[0123] //p' "$T/fds")
leaks=$(while read -r n target; do
    case $target in *fake-worker.sh) continue ;; esac
    printf '%s\n' "$allowed" | grep -qxF -- "$target" || echo "$n:$target"
done <"$T/fds" | tr '\n' ' ')
tap_is "$leaks" "" "no other descriptor of dsparkd (sockets, signalfd, other pipes) leaks into the worker"
grep -q 'host=' "$T/w/0.args"
tap_result $((1 - $?)) "the DSN is not on the worker's command line"

# heartbeats
start_sub "$T/hb.out" --topic 'hb|' --count 2 --timeout 5
wait_for "$T/hb.out" '^hb host=testhost queued=[0-9]+ running=[0-9]+ workers=2 counts_age=[0-9.]+$' 5
tap_result $? "heartbeats carry host, queue counts and ready workers"

# one job through its states, watched by batch and by job topic
bid=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
start_sub "$T/batch.out" --topic "job|$bid|" --timeout 60
tap_like "$(head -n 1 "$T/batch.out")" '^synced$' "a batch subscriber gets its subscription acknowledged"
jid=$(q "INSERT INTO dspark.jobs (batch_id, model, prompt, max_tokens) VALUES ($bid, 'm', 'hello', 8) RETURNING id")
wait_for "$T/batch.out" "^job id=$jid batch=$bid state=queued version=1 attempt=0 finish=-$" 5
tap_result $? "insert: a 'queued' event with version 1"
q "INSERT INTO dspark.jobs (batch_id, model, prompt) VALUES ($bid, 'm', 'neighbour')" >/dev/null
start_sub "$T/job.out" --topic "job|$bid|$jid|" --timeout 60
q "SELECT count(*) FROM dspark.claim_jobs('w-test', 10, NULL, 30)" >/dev/null
wait_for "$T/batch.out" "^job id=$jid batch=$bid state=running version=2 attempt=1 finish=-$" 5
tap_result $? "claim: a 'running' event with version 2 and attempt 1"
q "SELECT applied FROM dspark.finish_jobs('w-test', '[{\"id\": $jid, \"attempt\": 1, \"state\": \"succeeded\",
   \"output_text\": \"hi\", \"finish_reason\": \"stop\", \"stats\": {\"output_tokens\": 8,
   \"decode_tokens_per_s\": 123.5, \"mean_acceptance_length\": 2.5}}]')" >/dev/null
wait_for "$T/batch.out" "^job id=$jid batch=$bid state=succeeded version=3 attempt=1 finish=stop tokens=8 tps=123.50 tau=2.500$" 5
tap_result $? "write-back: a 'succeeded' event with the statistics"
states=$(grep "^job id=$jid " "$T/batch.out" | sed 's/.*state=\([a-z]*\) version=\([0-9]*\).*/\1:\2/' | tr '\n' ' ')
tap_is "$states" "queued:1 running:2 succeeded:3 " "the batch subscriber saw every state change, versions increasing"
# (the job subscriber is another process: give it the time to write the last event)
wait_for "$T/job.out" "^job id=$jid batch=$bid state=succeeded version=3 " 5
states=$(grep "^job " "$T/job.out" | sed 's/^job id=\([0-9]*\) .*state=\([a-z]*\) version=\([0-9]*\).*/\1:\2:\3/' | tr '\n' ' ')
tap_is "$states" "$jid:running:2 $jid:succeeded:3 " "the job subscriber (joined after the insert) saw later changes of that job only"

# one statement, 200 jobs: 200 events; other batches stay out of this topic
bid2=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
start_sub "$T/all.out" --topic 'job|' --timeout 8   # on for 5 s after its busy time: checkpoints every 200 ms
q "INSERT INTO dspark.jobs (batch_id, model, prompt) SELECT $bid2, 'm', 'p' || g FROM generate_series(1, 200) g" >/dev/null
wait_for "$T/all.out" "state=queued" 5
q "SELECT count(*) FROM dspark.claim_jobs('w-test', 500, NULL, 30)" >/dev/null
wait_for "$T/all.out" "^job id=[0-9]+ batch=$bid2 state=running" 5
sleep 1
tap_is "$(grep -c "batch=$bid2 state=queued version=1" "$T/all.out")" "200" "200 jobs inserted at once: 200 'queued' events"
tap_is "$(grep -c "batch=$bid2 state=running version=2" "$T/all.out")" "200" "200 jobs claimed at once: 200 'running' events"
tap_is "$(grep -c "batch=$bid2" "$T/batch.out")" "0" "a batch topic does not receive other batches"
tap_is "$(grep "^job " "$T/all.out" | sort | uniq -d | wc -l)" "0" "no event is published twice"
sleep 4
tap_is "$(cat "$T/all.out" "$T/batch.out" | grep -c '^again$')" "0" \
    "subscribers that keep up are never told to read again (checkpoints every 200 ms)"

# the late-subscriber pattern: subscribe, sync, read the row, drop older events
late=$("$SUB" --endpoint "$EP" --topic "job|$bid|$jid|" --job "$jid" --dsn "$DSPARK_DSN" --timeout 5 2>&1 | tr '\n' ' ')
tap_is "$late" "synced row succeeded 3 final succeeded 3 row " "a late subscriber learns the final state from the row"
j2=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'late') RETURNING id")
"$SUB" --endpoint "$EP" --topic "job|-|$j2|" --job "$j2" --dsn "$DSPARK_DSN" --timeout 20 >"$T/follow.out" 2>&1 &
FPID=$!
SUBPIDS="$SUBPIDS $FPID"
wait_for "$T/follow.out" '^row queued 1$' 10
q "SELECT count(*) FROM dspark.claim_jobs('w-test2', 1, NULL, 30, ARRAY['m'])" >/dev/null
q "SELECT applied FROM dspark.finish_jobs('w-test2', '[{\"id\": $j2, \"attempt\": 1, \"state\": \"failed\", \"error\": \"boom\"}]')" >/dev/null
wait "$FPID"
tap_is "$(tail -n 1 "$T/follow.out")" "final failed 3 event" "a subscriber of an unfinished job follows it to its final state"
tap_like "$(cat "$T/follow.out")" "state=running version=2" "... seeing the intermediate state"

# the lease reaper: an expired lease fails the job after max_attempts, else requeues
j3=$(q "INSERT INTO dspark.jobs (model, prompt, max_attempts, priority) VALUES ('reap', 'x', 1, 1000) RETURNING id")
j4=$(q "INSERT INTO dspark.jobs (model, prompt, max_attempts, priority) VALUES ('reap', 'y', 3, 1000) RETURNING id")
start_sub "$T/reap.out" --topic 'job|-|' --timeout 90
q "SELECT count(*) FROM dspark.claim_jobs('w-gone', 2, NULL, 1, ARRAY['reap'])" >/dev/null
wait_for "$T/reap.out" "^job id=$j3 batch=- state=failed version=3 attempt=1 finish=error$" 8
tap_result $? "reaper: lease expired at max_attempts -> 'failed' event"
wait_for "$T/reap.out" "^job id=$j4 batch=- state=queued version=3 attempt=1 finish=-$" 8
tap_result $? "reaper: lease expired -> back to 'queued' (attempt kept)"
tap_is "$(q "SELECT error FROM dspark.jobs WHERE id = $j3")" "lease expired after 1 attempts" "the reaper recorded the reason"
# and with it the expiry of queued jobs past their deadline (model 'late': no worker claims it)
j5=$(q "INSERT INTO dspark.jobs (model, prompt, expires_at) VALUES ('late', 'z', now() + interval '1 s') RETURNING id")
wait_for "$T/reap.out" "^job id=$j5 batch=- state=cancelled version=2 attempt=0 finish=expired$" 8
tap_result $? "dsparkd expires a job still queued at its deadline: 'cancelled' event, finish=expired"
wait_for "$T/dsparkd.log" "expiry: 1 queued job past its deadline cancelled" 5
tap_result $? "... and logs it"
# delayed jobs that come due: dsparkd clears their marks, 2,000 a pass (model 'due': no worker claims it)
q "INSERT INTO dspark.jobs (model, prompt, owner, run_after) SELECT 'due', 'ann', 'ann', now() + interval '1 s' FROM generate_series(1, 3000)" >/dev/null
j6=$(q "INSERT INTO dspark.jobs (model, prompt, owner, priority, run_after) VALUES ('due', 'bob', 'bob', 5, now() + interval '1.5 s') RETURNING id")
t0=$(date +%s)
n=
while [ $(( $(date +%s) - t0 )) -lt 8 ]; do
    n=$(q "SELECT count(*) FILTER (WHERE delayed) || '/' || count(*) FROM dspark.jobs WHERE model = 'due'")
    [ "$n" = "0/3001" ] && break
    sleep 0.2
done
tap_is "$n" "0/3001" "dsparkd lets the 3,001 delayed jobs that came due join the queue, in passes of 2,000"
tap_is "$(grep -c "^job id=$j6 " "$T/reap.out")|$(grep -c 'not job changes' "$T/dsparkd.log")" "1|0" \
    "... with no event beyond the one of the insert (their state did not change), and no complaint of the 'due:' notifications"
tap_is "$(q "SELECT prompt FROM dspark.claim_jobs('w-due', 1, NULL, 30, ARRAY['due'])")" "bob" \
    "... and a claim then goes by priority among them"

# the Prometheus endpoint
sleep 0.5   # a status read after the jobs above
scrape /metrics >"$T/metrics.txt"
tap_is "$(head -n 1 "$T/metrics.txt")" "200 text/plain; version=0.0.4; charset=utf-8" "GET /metrics: 200, the text exposition format"
tap_like "$(cat "$T/metrics.txt")" '^dspark_database_up 1$' "... the database is up"
tap_like "$(cat "$T/metrics.txt")" '^dspark_workers\{state="ready"\} 2$' "... both workers are ready"
tap_like "$(cat "$T/metrics.txt")" "^dspark_jobs\\{state=\"queued\"\\} $(q "SELECT count(*) FROM dspark.jobs WHERE state = 'queued'")\$" \
    "... the queued jobs, as the database counts them"
tap_like "$(cat "$T/metrics.txt")" '^dspark_expired_jobs_total 1$' "... the job expired above"
tap_like "$(cat "$T/metrics.txt")" '^dspark_due_jobs_total 3001$' "... the delayed jobs that came due above"
tap_like "$(cat "$T/metrics.txt")" '^dspark_reaped_jobs_total [2-9]' "... the jobs the reaper took above"
tap_like "$(cat "$T/metrics.txt")" '^dspark_events_published_total [1-9][0-9]*$' "... and the events published"
tap_is "$(sed 1d "$T/metrics.txt" | grep -v '^# \(HELP\|TYPE\) dspark_[a-z_]* ' | grep -cvE '^dspark_[a-z_]+(\{(state|device)="[a-z0-9]+"\})? [0-9]+(\.[0-9]+)?$')" 0 \
    "every line is a HELP, a TYPE or a sample"
tap_is "$(scrape /nothing | head -n 1 | cut -d' ' -f1) $(scrape POST /metrics | head -n 1 | cut -d' ' -f1)" "404 405" \
    "another path is 404, another method 405"
tap_is "$(scrape POST /metrics | grep -c '^Allow: GET, HEAD$')" "1" "... naming the methods (Allow)"
# 16 connections that stall mid-request, twice the slots: scrapes still get through
python3 -c 'import socket, sys, time
ss = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(16)]
for s in ss: s.send(b"GET /met")
time.sleep(3)' "$MPORT" &
STALL=$!
sleep 0.5
ok=0
for i in 1 2 3; do
    [ "$(SCRAPE_TIMEOUT=1 scrape /metrics 2>/dev/null | head -n 1)" = "200 text/plain; version=0.0.4; charset=utf-8" ] && ok=$((ok + 1))
done
tap_is "$ok" 3 "16 clients that stall mid-request do not hold up scrapes (3 of 3 answered)"
wait "$STALL"
# ":PORT" listens on every address: IPv4, and IPv6 where the host has it
MPORT2=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '[metrics]\nlisten = :%s\n[database]\ndsn = "%s"\n[events]\nendpoint = ipc://%s/any.sock\n' "$MPORT2" "$DSPARK_DSN" "$T" >"$T/any.conf"
"$DSPARKD" --config "$T/any.conf" 2>"$T/any.log" &
APID=$!
wait_for "$T/any.log" "ready: 0 workers" 10
v4=$(MPORT=$MPORT2 scrape /metrics | head -n 1 | cut -d' ' -f1)
if python3 -c 'import socket; s = socket.socket(socket.AF_INET6); s.bind(("::1", 0))' 2>/dev/null; then
    v6=$(python3 -c 'import http.client, sys; c = http.client.HTTPConnection("::1", int(sys.argv[1]), timeout=5); c.request("GET", "/metrics"); print(c.getresponse().status)' "$MPORT2" 2>&1)
else
    v6=200   # no IPv6 on this host
fi
tap_is "$v4 $v6" "200 200" "listen = :PORT answers on 127.0.0.1 and on ::1"
kill -TERM "$APID"
wait "$APID"
out=$(printf '[metrics]\nlisten = 127.0.0.1:%s\n[database]\ndsn = "%s"\n[events]\nendpoint = ipc://%s/taken.sock\n' \
    "$MPORT" "$DSPARK_DSN" "$T" >"$T/taken.conf"; "$DSPARKD" --config "$T/taken.conf" 2>&1)
tap_is "$?" 1 "a second dsparkd on the same metrics port exits 1"
tap_like "$out" "metrics.listen '127.0.0.1:$MPORT': Address already in use" "... saying why"

# notifications are believed only as far as the row allows: anyone who may
# connect can NOTIFY on the channel
jf=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('forge', 'x') RETURNING id")
start_sub "$T/forge.out" --topic "job|-|$jf|" --timeout 30
q "SELECT count(*) FROM dspark.claim_jobs('w-forge', 1, NULL, 300, ARRAY['forge'])" >/dev/null
q "UPDATE dspark.jobs SET lease_expires_at = now() + interval '300 s' WHERE id = $jf" >/dev/null
q "UPDATE dspark.jobs SET lease_expires_at = now() + interval '300 s' WHERE id = $jf" >/dev/null
q "NOTIFY dspark_events, '$jf:3:s:1'" >/dev/null
psql -X -q -c "BEGIN" \
    -c "SELECT count(*) FROM dspark.finish_jobs('w-forge', '[{\"id\": $jf, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"x\", \"finish_reason\": \"stop\"}]')" \
    -c "SELECT pg_notify('dspark_events', '$jf:999999:r:1')" -c "SELECT pg_notify('dspark_events', '$jf:5:r:1')" \
    -c "COMMIT" >/dev/null
wait_for "$T/forge.out" "^job id=$jf batch=- state=succeeded version=5 " 10
tap_result $? "forged changes above the row's version, or at its version with another state, do not hold back the real final event"
tap_is "$(grep -c "state=succeeded version=3" "$T/forge.out")" "0" "a forged final state is not published"
psql -X -q -c "DO \$\$ BEGIN FOR i IN 1..50 LOOP PERFORM pg_notify('dspark_events', 'not a change ' || i); END LOOP; END \$\$" \
    >/dev/null
wait_for "$T/dsparkd.log" "ignoring [0-9]+ notifications? on 'dspark_events' that are not job changes" 5
tap_is "$(grep -cE "ignoring [0-9]+ notifications? on 'dspark_events'" "$T/dsparkd.log")" "1" \
    "50 notifications that are not job changes make one log line, not 50"

# a worker killed with SIGKILL is restarted
pid0=$(cat "$T/w/0.pid")
kill -KILL "$pid0"
wait_for "$T/dsparkd.log" "worker for device '0' \\(pid $pid0\\) was terminated by signal 9" 5
tap_result $? "dsparkd notices a crashed worker"
n=0
while [ "$(cat "$T/w/0.pid")" = "$pid0" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
tap_result $([ "$(cat "$T/w/0.pid")" != "$pid0" ]; echo $?) "and starts a new one after the back-off"
wait_for "$T/dsparkd.log" "worker for device '0' \\(pid $(cat "$T/w/0.pid")\\) is ready" 5
tap_result $? "the new worker becomes ready"
scrape /metrics >"$T/metrics2.txt"
tap_is "$(grep '^dspark_worker_' "$T/metrics2.txt" | tr '\n' ' ')" \
    'dspark_worker_ready{device="0"} 1 dspark_worker_ready{device="1"} 1 dspark_worker_failures_total{device="0"} 1 dspark_worker_failures_total{device="1"} 0 ' \
    "the metrics count the crash against device 0, and both workers ready"

# PostgreSQL stops: heartbeats go on, and say how old their queue counts are
pg_harness_ctl -m fast -w -s stop >/dev/null 2>&1
sleep 3
start_sub "$T/hb-down.out" --topic 'hb|' --count 1 --timeout 5
wait_for "$T/hb-down.out" '^hb ' 5
age=$(sed -n 's/^hb .* counts_age=\([0-9.]*\)$/\1/p' "$T/hb-down.out")
tap_result "$(awk -v a="${age:-0}" 'BEGIN { print (a >= 2.5) ? 0 : 1 }')" \
    "while the database is down, a heartbeat's counts are older than the outage (counts_age ${age:-missing} s)"
pg_harness_ctl -w -s start >/dev/null 2>&1
wait_for "$T/dsparkd.log" "database connection restored" 20
tap_result $? "dsparkd reconnects when PostgreSQL is back"
start_sub "$T/hb-up.out" --topic 'hb|' --count 3 --timeout 5
wait_for "$T/hb-up.out" '^hb .* counts_age=0\.[0-9]$' 5
tap_result $? "... and its heartbeats' counts are fresh again"

# PostgreSQL restarts: dsparkd reconnects, listens again, publishes
pg_harness_ctl -m fast -w -s restart >/dev/null 2>&1
n=0
while [ "$(grep -c "database connection restored" "$T/dsparkd.log")" -lt 2 ] && [ $n -lt 200 ]; do
    sleep 0.1
    n=$((n + 1))
done
tap_result "$([ $n -lt 200 ]; echo $?)" "dsparkd reconnects after a PostgreSQL restart"
j5=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'after restart') RETURNING id")
wait_for "$T/reap.out" "^job id=$j5 batch=- state=queued version=1" 5
tap_result $? "events flow again after the reconnection (LISTEN re-issued)"
kill -0 "$DPID" 2>/dev/null
tap_result $? "dsparkd survived the database restart"

# SIGHUP: reloadable keys change, others are reported and kept; errors change nothing
sed -i 's/^heartbeat_interval = 200ms$/heartbeat_interval = 300ms\nsndhwm = 5000/' "$T/dspark.conf"
kill -HUP "$DPID"
wait_for "$T/dsparkd.log" "parameter 'events.heartbeat_interval' changed from '200ms' to '300ms'" 5
tap_result $? "SIGHUP applies a reloadable key"
wait_for "$T/dsparkd.log" "parameter 'events.sndhwm' cannot be changed without restarting, ignoring" 5
tap_result $? "SIGHUP reports a key that needs a restart"
echo "bogus = 1" >>"$T/dspark.conf"
kill -HUP "$DPID"
wait_for "$T/dsparkd.log" "configuration file contains errors; no changes were applied: .* line [0-9]+: unknown key 'bogus' in section \\[worker\\]" 5
tap_result $? "SIGHUP with a broken file keeps the running configuration"
kill -0 "$DPID" 2>/dev/null
tap_result $? "dsparkd still runs after a bad reload"
# a file that a start would refuse changes nothing either (the reloadable keys were applied before, with a warning)
sed -i '/^bogus = 1$/d; s/^heartbeat_interval = 300ms$/heartbeat_interval = 400ms/' "$T/dspark.conf"
echo "restart_delay_max = 150ms" >>"$T/dspark.conf"   # (below restart_delay, 200ms)
line=$(grep -n '^restart_delay_max' "$T/dspark.conf" | cut -d: -f1)
kill -HUP "$DPID"
wait_for "$T/dsparkd.log" "no changes were applied: '$T/dspark.conf' line $line: worker.restart_delay_max is smaller than worker.restart_delay" 5
tap_result $? "SIGHUP with a file that a start would refuse keeps the running configuration, naming its line"
tap_is "$(grep -c "changed from '300ms' to '400ms'\|'worker.restart_delay_max' changed" "$T/dsparkd.log")" "0" \
    "... and applies none of its keys"
sed -i '/^restart_delay_max = 150ms$/d' "$T/dspark.conf"

# SIGTERM: workers drain, dsparkd exits 0
kill -TERM "$DPID"
n=0
while kill -0 "$DPID" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
wait "$DPID"
rc=$?
DPID=
tap_is "$rc" "0" "SIGTERM: dsparkd exits 0 after its workers"
tap_is "$(cat "$T/w/0.log" "$T/w/1.log" | grep -c '^drained')" "2" "both workers got SIGTERM and drained"

# supervision: a worker that never gets ready, one that hangs, one that ignores SIGTERM
mkdir -p "$T/w2"
cat >"$T/sup.conf" <<EOF
[database]
dsn = "$DSPARK_DSN"
[events]
endpoint = ipc://$T/events2.sock
[worker]
program = $DS_SRCDIR/tests/integration/fake-worker.sh
devices = 0-2
start_timeout = 1s
watchdog_timeout = 1s
drain_timeout = 1s
restart_delay = 100ms
EOF
FAKE_WORKER_DIR="$T/w2" FAKE_WORKER_NEVER_READY=0 FAKE_WORKER_HANG=1 FAKE_WORKER_IGNORE_TERM=2 \
    "$DSPARKD" --config "$T/sup.conf" 2>"$T/sup.log" &
DPID=$!
wait_for "$T/sup.log" "killing worker for device '0' \\(pid [0-9]+\\): not ready within worker.start_timeout" 8
tap_result $? "a worker not ready within start_timeout is killed"
wait_for "$T/sup.log" "killing worker for device '1' \\(pid [0-9]+\\): no WATCHDOG within worker.watchdog_timeout" 8
tap_result $? "a worker that stops sending WATCHDOG is killed"
n=0
while [ "$(grep -c '^start' "$T/w2/0.log")" -lt 2 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
tap_result $([ "$(grep -c '^start' "$T/w2/0.log")" -ge 2 ]; echo $?) "killed workers are started again"
# readiness with the workers that are ready, once device 0 (never ready) was
# killed for start_timeout; device 1 may have been killed for hanging by then
wait_for "$T/sup.log" "^<4>ready: [12] of 3 workers, " 5
tap_result $? "a worker that never gets ready: dsparkd gets ready with the others after its first failure"
kl=$(grep -n "worker for device '0' (pid [0-9]*) was terminated by signal 9 (killed by dsparkd)" "$T/sup.log" |
    head -n 1 | cut -d: -f1)
rl=$(grep -n "ready: [12] of 3 workers" "$T/sup.log" | head -n 1 | cut -d: -f1)
tap_result $([ -n "$kl" ] && [ -n "$rl" ] && [ "$kl" -lt "$rl" ]; echo $?) \
    "... not before it was killed for start_timeout (log lines $kl, $rl)"
tap_like "$(grep '^<4>ready:' "$T/sup.log")" "; not ready: device '0' \\(failed [0-9]+ times?, " \
    "... with a warning naming the device that is not ready"
tap_is "$(grep -c '^<[0-7]>ready:' "$T/sup.log")" "1" "... once"
kill -TERM "$DPID"
t0=$(date +%s)
wait "$DPID"
rc=$?
DPID=
t1=$(date +%s)
tap_is "$rc" "0" "SIGTERM with a worker that ignores it: dsparkd still exits 0"
tap_like "$(cat "$T/sup.log")" "killing worker for device '2' \\(pid [0-9]+\\): drain timeout" \
    "the worker that ignored SIGTERM is killed after the drain timeout"
tap_result $([ $((t1 - t0)) -le 5 ]; echo $?) "... within drain_timeout plus grace ($((t1 - t0)) s)"
tap_like "$(head -n 1 "$T/dsparkd.log")" '^<[0-7]>' "log lines carry <N> priority prefixes when stderr is a file"

# events for other hosts: tcp on all addresses needs CURVE; the allow-list is reread on SIGHUP
printf '[events]\nendpoint = tcp://0.0.0.0:5557\n' >"$T/open.conf"
out=$("$DSPARKD" --check-config -c "$T/open.conf" 2>&1)
tap_is "$?" "78" "a tcp endpoint on all addresses without CURVE is refused"
tap_like "$out" "reachable from other hosts" "... saying why"
"$DSPARKD" --curve-keypair >"$T/server.key"
"$DSPARKD" --curve-keypair >"$T/alice.key"
"$DSPARKD" --curve-keypair >"$T/bob.key"
grep '^public-key' "$T/alice.key" >"$T/allow"
spub=$(sed -n 's/^public-key = "\(.*\)"$/\1/p' "$T/server.key")
cat >"$T/curve.conf" <<EOF
[database]
dsn = "$DSPARK_DSN"
[events]
endpoint = tcp://0.0.0.0:*
curve_secret_key_file = $T/server.key
curve_allow_file = $T/allow
EOF
chmod 644 "$T/server.key"
out=$("$DSPARKD" --check-config --config "$T/curve.conf" 2>&1)
tap_like "$?|$out" "^0\|.*'$T/server.key' holds the CURVE secret key and every user may read it \(mode 0644\)" \
    "a secret key file every user may read is named in a warning"
chmod 640 "$T/server.key"
tap_is "$("$DSPARKD" --check-config --config "$T/curve.conf" 2>&1 | grep -c 'every user may read')" "0" \
    "... and not at mode 0640"
"$DSPARKD" --config "$T/curve.conf" 2>"$T/curve.log" &
DPID=$!
wait_for "$T/curve.log" "ready: 0 workers, events on 'tcp://0.0.0.0:[0-9]+'" 10
tap_result $? "dsparkd publishes on tcp with CURVE"
port=$(sed -n "s/.*ready: 0 workers, events on 'tcp:\\/\\/0.0.0.0:\\([0-9]*\\)'.*/\\1/p" "$T/curve.log")
"$SUB" --endpoint "tcp://127.0.0.1:$port" --topic 'hb|' --count 1 --timeout 5 \
    --server-key "$spub" --client-keys "$T/alice.key" >"$T/alice.out" 2>&1
tap_like "$(cat "$T/alice.out")" "^hb host=" "an allowed client receives events"
"$SUB" --endpoint "tcp://127.0.0.1:$port" --topic 'hb|' --count 1 --timeout 2 \
    --server-key "$spub" --client-keys "$T/bob.key" >"$T/bob.out" 2>&1
tap_is "$(cat "$T/bob.out")" "nosync" "a client not on the allow-list is refused"
"$SUB" --endpoint "tcp://127.0.0.1:$port" --topic 'hb|' --count 1 --timeout 2 >"$T/plain.out" 2>&1
tap_is "$(cat "$T/plain.out")" "nosync" "a client without CURVE is refused"
grep '^public-key' "$T/bob.key" >>"$T/allow"
kill -HUP "$DPID"
wait_for "$T/curve.log" "reloaded the CURVE allow-list" 5
"$SUB" --endpoint "tcp://127.0.0.1:$port" --topic 'hb|' --count 1 --timeout 5 \
    --server-key "$spub" --client-keys "$T/bob.key" >"$T/bob.out" 2>&1
tap_like "$(cat "$T/bob.out")" "^hb host=" "SIGHUP rereads the allow-list file: the new client gets in"
kill -TERM "$DPID"
wait "$DPID"
DPID=

# start_small NAME LOG DSPARKD-LINES [EVENTS-LINES]: a dsparkd without workers, its events on
# ipc://$T/NAME.sock, configured by $T/NAME.conf with DSPARKD-LINES in its
# [dsparkd] section (and EVENTS-LINES in [events]); waits until it is ready (pid in DPID)
start_small() {
    printf '[dsparkd]\n%s\n[database]\ndsn = "%s"\n[events]\nendpoint = ipc://%s/%s.sock\n%s\n' \
        "$3" "$DSPARK_DSN" "$T" "$1" "${4:-}" >"$T/$1.conf"
    "$DSPARKD" --config "$T/$1.conf" 2>"$2" &
    DPID=$!
    wait_for "$2" "ready: 0 workers" 10
}

# a read of notified rows that fails (a statement timeout: job_stats locked, as
# by VACUUM FULL) is tried again, and the change is published once it works
start_small slow "$T/slow.log" "$(printf 'status_interval = 200ms\ndb_timeout = 300ms')"
js=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('slow', 'x') RETURNING id")
"$SUB" --endpoint "ipc://$T/slow.sock" --topic "job|-|$js|" --timeout 20 >"$T/slow.out" 2>&1 &
SUBPIDS="$SUBPIDS $!"
wait_for "$T/slow.out" '^(synced|nosync)' 10
psql -X -q -c "BEGIN" -c "LOCK TABLE dspark.job_stats IN ACCESS EXCLUSIVE MODE" -c "SELECT pg_sleep(2)" -c "COMMIT" \
    >/dev/null 2>&1 &
sleep 0.3
q "SELECT count(*) FROM dspark.cancel_jobs(ARRAY[$js]::bigint[])" >/dev/null
wait_for "$T/slow.out" "^job id=$js batch=- state=cancelled " 10
tap_result $? "a change whose row could not be read at first is published once it can"
tap_like "$(cat "$T/slow.log")" "reading notified jobs failed: .*statement timeout" "... after the failed read was logged"
kill -TERM "$DPID"
wait "$DPID"
DPID=

# a subscriber that falls behind the high-water mark loses events; the next
# heartbeat's counts tell it to read the rows again
start_small hwm "$T/hwm.log" "status_interval = 200ms" "$(printf 'sndhwm = 100\nheartbeat_interval = 200ms')"
bh=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
"$SUB" --endpoint "ipc://$T/hwm.sock" --topic "job|$bh|" --pause 5 --timeout 40 >"$T/hwm.out" 2>&1 &
SUBPIDS="$SUBPIDS $!"
wait_for "$T/hwm.out" '^(synced|nosync)' 10
q "INSERT INTO dspark.jobs (batch_id, model, prompt) SELECT $bh, 'hwm', 'p' FROM generate_series(1, 30000) g" >/dev/null
wait_for "$T/hwm.out" '^again$' 40
tap_result $? "a subscriber that fell behind by more than events.sndhwm is told to read again"
n_hwm=$(grep -c "^job id=[0-9]* batch=$bh state=queued" "$T/hwm.out")
tap_result $([ "$n_hwm" -lt 30000 ]; echo $?) "... having lost events ($n_hwm of 30000 reached it)"
kill -TERM "$DPID"
wait "$DPID"
DPID=

# a job that finished while dsparkd was down (killed, and started again) has its
# final state published a little after the new start, for the subscribers
# that reconnected
start_small restart "$T/restart1.log" "status_interval = 200ms"
jr=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('restart', 'x') RETURNING id")
"$SUB" --endpoint "ipc://$T/restart.sock" --topic "job|-|$jr|" --job "$jr" --dsn "$DSPARK_DSN" --timeout 20 \
    >"$T/restart.out" 2>&1 &
SUBPIDS="$SUBPIDS $!"
wait_for "$T/restart.out" "^row queued 1$" 10
kill -KILL "$DPID"
wait "$DPID" 2>/dev/null
q "SELECT count(*) FROM dspark.claim_jobs('w-restart', 1, NULL, 300, ARRAY['restart'])" >/dev/null
q "SELECT count(*) FROM dspark.finish_jobs('w-restart', '[{\"id\": $jr, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"x\"}]')" >/dev/null
"$DSPARKD" --config "$T/restart.conf" 2>"$T/restart2.log" &
DPID=$!
wait_for "$T/restart.out" "state=succeeded version=3" 15
tap_result $? "a subscriber learns the final state of a job that finished while dsparkd was down, once it is back"
tap_like "$(cat "$T/restart2.log")" "published [0-9]+ jobs? that finished before this dsparkd started" "... republished at start"
kill -TERM "$DPID"
wait "$DPID"
DPID=

# more finished while it was down than a catch-up once read (the 100,000 latest): every one is published, in
# pages, the earliest job's final state among them
q "INSERT INTO dspark.jobs (model, prompt, state, attempt, worker_id, started_at, finished_at, version)
   SELECT 'many', 'm' || g, 'succeeded', 1, 'w-many', now(), now(), 3 FROM generate_series(1, 100010) g" >/dev/null
jm=$(q "SELECT min(id) FROM dspark.jobs WHERE model = 'many'")
"$DSPARKD" --config "$T/restart.conf" 2>"$T/restart3.log" &
DPID=$!
"$SUB" --endpoint "ipc://$T/restart.sock" --topic "job|-|$jm|" --timeout 30 --count 1 >"$T/many.out" 2>&1 &
SUBPIDS="$SUBPIDS $!"
wait_for "$T/restart3.log" "published [0-9]+ jobs? that finished before this dsparkd started" 30
nm=$(sed -n 's/.*published \([0-9]*\) jobs that finished before this dsparkd started.*/\1/p' "$T/restart3.log")
tap_result $([ "${nm:-0}" -ge 100010 ]; echo $?) \
    "more than 100,000 jobs that finished while dsparkd was down are all published at its start (${nm:-none})"
wait_for "$T/many.out" "^job id=$jm .*state=succeeded version=3" 10
tap_result $? "... the earliest of them too"
kill -TERM "$DPID"
wait "$DPID"
DPID=
q "DELETE FROM dspark.jobs WHERE model = 'many'" >/dev/null

# the reaper's grace after connecting: a lease that ran out while dsparkd was
# away is left to its worker for reaper_grace, then reaped
jg=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('grace', 'x') RETURNING id")
q "SELECT count(*) FROM dspark.claim_jobs('w-away', 1, NULL, 1, ARRAY['grace'])" >/dev/null
sleep 1.2
start_small grace "$T/grace.log" "$(printf 'reaper_interval = 1s\nreaper_grace = 3s')"
kill -HUP "$DPID"
wait_for "$T/grace.log" "configuration reloaded" 5
sleep 1.2
tap_is "$(q "SELECT state FROM dspark.jobs WHERE id = $jg")" "running" \
    "after connecting, the reaper leaves an expired lease alone for reaper_grace (a reload meanwhile too)"
n=0
while [ "$(q "SELECT state FROM dspark.jobs WHERE id = $jg")" != queued ] && [ $n -lt 60 ]; do sleep 0.1; n=$((n + 1)); done
tap_is "$(q "SELECT state FROM dspark.jobs WHERE id = $jg")" "queued" "... and requeues it after"
kill -TERM "$DPID"
wait "$DPID"
DPID=

# more jobs past their deadline than one sweep ends: the next sweep follows
# 0.2 s later, not a reaper_interval later
q "INSERT INTO dspark.jobs (model, prompt, expires_at) SELECT 'late', 'x', now() - interval '1 s' FROM generate_series(1, 10500)" >/dev/null
start_small sweep "$T/sweep.log" "$(printf 'reaper_interval = 1h\nreaper_grace = 0s')"
wait_for "$T/sweep.log" "expiry: 500 queued jobs past their deadline cancelled$" 5
tap_result $? "a full expiry sweep (2,000 jobs) is followed by the next one 0.2 s later"
tap_like "$(cat "$T/sweep.log")" "expiry: 2000 queued jobs past their deadline cancelled \\(more in 0.2 s\\)" "... and says so"
tap_is "$(grep -c 'expiry: 2000 ' "$T/sweep.log")" 5 "... five full sweeps for 10,500 jobs, then the rest"
kill -TERM "$DPID"
wait "$DPID"
DPID=

# configuration errors and a schema this build does not know
printf '[dsparkd]\nreaper_interval = 1s\nreaper_interval = 2s\n' >"$T/bad.conf"
out=$("$DSPARKD" --check-config -c "$T/bad.conf" 2>&1)
rc=$?
tap_is "$rc" "78" "--check-config rejects a bad file with exit status 78"
tap_like "$out" "line 3: key 'reaper_interval' in section \\[dsparkd\\] is already set on line 2" "... naming the line"
printf '[worker]\ndevices = 0,cpu\n' >"$T/bad.conf"
out=$("$DSPARKD" --check-config -c "$T/bad.conf" 2>&1)
tap_is "$?" "78" "--check-config rejects a device that is not an index (the worker's --device takes one)"
tap_like "$out" "'$T/bad.conf' line 2: worker.devices: invalid device 'cpu'" "... naming it and its line"
printf '[worker]\ndevices = 0,00\n' >"$T/bad.conf"
out=$("$DSPARKD" --check-config -c "$T/bad.conf" 2>&1)
tap_is "$?|$(printf '%s' "$out" | grep -c 'worker.devices: device 0 is listed twice')" "78|1" \
    "--check-config rejects one device written twice ('00' is 0: two workers on one GPU before)"
printf '[worker]\ndevices = 1-2x\n' >"$T/bad.conf"
out=$("$DSPARKD" --check-config -c "$T/bad.conf" 2>&1)
tap_is "$?|$(printf '%s' "$out" | grep -c "worker.devices: invalid range '1-2x'")" "78|1" \
    "... and a range with text after it (read as 1-2 before)"
printf '[worker]\nbackend = gpu\n' >"$T/bad.conf"
out=$("$DSPARKD" --check-config -c "$T/bad.conf" 2>&1)
tap_is "$?|$(printf '%s' "$out" | grep -c "worker.backend 'gpu' is not auto, cpu or cuda")" "78|1" \
    "... and a backend the worker does not know (its worker exited 78 at every restart)"
printf '[events]\nsocket_mode = 0000\n' >"$T/bad.conf"
out=$("$DSPARKD" --check-config -c "$T/bad.conf" 2>&1)
tap_is "$?|$(printf '%s' "$out" | grep -c "line 2: events.socket_mode '0000' lets no one connect")" "78|1" \
    "... and an ipc socket mode of 0 (it passed, then was not applied)"
printf '[metrics]\nlisten = localhost:http\n' >"$T/bad.conf"
out=$("$DSPARKD" --check-config -c "$T/bad.conf" 2>&1)
tap_is "$?" "78" "--check-config rejects a metrics address without a port number"
tap_like "$out" "metrics.listen 'localhost:http' is not HOST:PORT" "... naming it"
q "INSERT INTO dspark.schema_version (version, name) VALUES (99, '099-future')" >/dev/null
sed -i '/^bogus = 1$/d; /^devices = /d' "$T/dspark.conf"
timeout 20 "$DSPARKD" -c "$T/dspark.conf" >"$T/future.log" 2>&1
rc=$?
tap_is "$rc" "78" "dsparkd refuses a database schema it does not know (exit 78)"
tap_like "$(cat "$T/future.log")" "database schema version 99, this build knows [0-9]+: run 'dsparkctl db migrate'" \
    "... with the migration hint"

tap_done
