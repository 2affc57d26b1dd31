#!/bin/sh
# test-daemon-notify.sh: dsparkd and the service manager protocol, with a
# stand-in for systemd's notification socket (tests/integration/test-daemon-notify-recv)
# and WATCHDOG_USEC set as systemd sets it for WatchdogSec=: no READY=1 while a
# worker is still loading, READY=1 once it is ready, WATCHDOG=1 while healthy,
# no WATCHDOG=1 while PostgreSQL is down and again once it is back,
# RELOADING=1 with MONOTONIC_USEC then READY=1 on SIGHUP, STOPPING=1 on SIGTERM.
# Then with two workers: no READY=1 while one that has not failed yet is still
# loading; READY=1 with both healthy; READY=1 with the healthy one once the
# other was killed for worker.start_timeout, STATUS= naming the device that is
# not ready until it is.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/pg-harness.sh"

DSPARKD="$DS_BUILDDIR/dsparkd"
RECV="$DS_BUILDDIR/tests/integration/test-daemon-notify-recv"
[ -x "$DSPARKD" ] || tap_skip_all "dsparkd not built"
[ -x "$RECV" ] || tap_skip_all "tests/integration/test-daemon-notify-recv not built"

pg_harness_start
T=$(mktemp -d "${TMPDIR:-/tmp}/dspark-dn.XXXXXX")
DPID=
RPID=
NOUT="$T/notify.out"
DLOG="$T/dsparkd.log"
cleanup() {
    [ -n "$DPID" ] && kill -KILL "$DPID" 2>/dev/null
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null
    for f in "$T"/w*/*.pid; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null; done
    if [ "$tap_failed" -gt 0 ] 2>/dev/null; then
        echo "# notifications:"
        sed 's/^/#   /' "$NOUT" 2>/dev/null | tail -n 40
        echo "# dsparkd log:"
        sed 's/^/#   /' "$DLOG" 2>/dev/null | tail -n 40
    fi
    rm -rf "$T"
    pg_harness_stop
}
trap cleanup EXIT

for f in "$DS_SRCDIR"/sql/[0-9]*.sql; do
    psql -X -q -v ON_ERROR_STOP=1 -1 -f "$f" >/dev/null 2>"$T/schema.err" ||
        { echo "Bail out! applying $f failed: $(cat "$T/schema.err")"; exit 1; }
done

count() {
    grep -Ec -- "$2" "$1" 2>/dev/null
}

mkdir -p "$T/w"
cat >"$T/dspark.conf" <<EOF
[dsparkd]
status_interval = 200ms
retention = 1h
retention_interval = 1s
[database]
dsn = "$DSPARK_DSN"
[events]
endpoint = ipc://$T/events.sock
[worker]
program = $DS_SRCDIR/tests/integration/fake-worker.sh
devices = 0
EOF

# one job that finished two hours ago, one 50 minutes ago: retention (1h) deletes the first
q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'old'), ('m', 'recent')" >/dev/null
q "SELECT count(*) FROM dspark.claim_jobs('w', 2, NULL, 60)" >/dev/null
q "SELECT count(*) FROM dspark.finish_jobs('w', '[{\"id\": 1, \"attempt\": 1, \"state\": \"succeeded\"},
                                           {\"id\": 2, \"attempt\": 1, \"state\": \"succeeded\"}]')" >/dev/null
q "UPDATE dspark.jobs SET finished_at = now() - CASE id WHEN 1 THEN interval '2 hours' ELSE interval '50 minutes' END" \
    >/dev/null

"$RECV" "$T/notify.sock" 120 >"$T/notify.out" 2>&1 &
RPID=$!
n=0
while [ ! -S "$T/notify.sock" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done

# the worker holds back READY until the gate file exists
NOTIFY_SOCKET="$T/notify.sock" WATCHDOG_USEC=1000000 FAKE_WORKER_DIR="$T/w" FAKE_WORKER_GATE="$T/go" \
    "$DSPARKD" --config "$T/dspark.conf" 2>"$T/dsparkd.log" &
DPID=$!
# a process's CPU time so far, user and system, in clock ticks
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

wait_for "$T/notify.out" "STATUS=starting: 0 of 1 workers ready" 10
tap_result $? "STATUS= tells that dsparkd waits for its worker"
sleep 1
tap_is "$(count "$T/notify.out" '^[0-9]+ READY=1$')" "0" "no READY=1 while the worker is not ready"
tap_like "$(cat "$T/notify.out")" "EXTEND_TIMEOUT_USEC=[0-9]+" "EXTEND_TIMEOUT_USEC= while starting"

touch "$T/go"
wait_for "$T/notify.out" '^[0-9]+ READY=1$' 10
tap_result $? "READY=1 once the worker said READY"
wait_for "$T/notify.out" 'STATUS=[0-9]+ queued, [0-9]+ running, 1/1 workers, [0-9.]+ tokens/s' 5
tap_result $? "STATUS= shows queued, running, workers and tokens/s"
w0=$(count "$T/notify.out" '^[0-9]+ WATCHDOG=1$')
sleep 1.6
w1=$(count "$T/notify.out" '^[0-9]+ WATCHDOG=1$')
tap_result $([ $((w1 - w0)) -ge 2 ]; echo $?) "WATCHDOG=1 about every half interval while healthy ($((w1 - w0)) in 1.6 s)"

wait_for "$T/dsparkd.log" "retention: deleted 1 finished job$" 5
tap_result $? "retention deletes finished jobs older than dsparkd.retention"
tap_is "$(q "SELECT string_agg(id::text, ',') FROM dspark.jobs")" "2" "... and keeps the younger one"

# the database goes away: the watchdog pings stop (systemd would restart us)
pg_harness_ctl -m fast -w -s stop >/dev/null 2>&1
wait_for "$T/notify.out" "STATUS=database unavailable" 5
tap_result $? "STATUS= reports the unavailable database"
sleep 1.2
w2=$(count "$T/notify.out" '^[0-9]+ WATCHDOG=1$')
c2=$(cpu_ticks "$DPID")
sleep 1.5
w3=$(count "$T/notify.out" '^[0-9]+ WATCHDOG=1$')
c3=$(cpu_ticks "$DPID")
tap_is "$((w3 - w2))" "0" "no WATCHDOG=1 while the database does not answer"
# (the withheld ping's deadline once stayed in the past: the loop polled with no timeout, a core busy)
tap_result $([ $((c3 - c2)) -lt 40 ]; echo $?) \
    "... and dsparkd does not spin meanwhile ($((c3 - c2)) clock ticks of CPU in 1.5 s)"
pg_harness_ctl -w -s start >/dev/null 2>&1
n=0
while [ "$(count "$T/notify.out" '^[0-9]+ WATCHDOG=1$')" -le "$w3" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
tap_result $([ "$(count "$T/notify.out" '^[0-9]+ WATCHDOG=1$')" -gt "$w3" ]; echo $?) \
    "WATCHDOG=1 resumes once the database is back"

# reload
r0=$(count "$T/notify.out" '^[0-9]+ READY=1$')
kill -HUP "$DPID"
wait_for "$T/notify.out" '^[0-9]+ RELOADING=1 MONOTONIC_USEC=[0-9]+$' 5
tap_result $? "SIGHUP: RELOADING=1 with MONOTONIC_USEC"
n=0
while [ "$(count "$T/notify.out" '^[0-9]+ READY=1$')" -le "$r0" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
last=$(grep -E '^[0-9]+ (RELOADING=1|READY=1)' "$T/notify.out" | tail -n 2 | sed 's/^[0-9]* //; s/ MONOTONIC.*//' | tr '\n' ' ')
tap_is "$last" "RELOADING=1 READY=1 " "... then READY=1"
mono=$(sed -n 's/^[0-9]* RELOADING=1 MONOTONIC_USEC=\([0-9]*\)$/\1/p' "$T/notify.out" | tail -n 1)
now=$(awk '{ printf "%.0f", $1 * 1000000 }' /proc/uptime)
# /proc/uptime (boot time, suspends included) counts in hundredths of a second: one tick of slack
tap_result $([ -n "$mono" ] && [ "$mono" -gt 0 ] && [ "$mono" -le $((now + 10000)) ]; echo $?) \
    "MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds"

# stop
kill -TERM "$DPID"
wait_for "$T/notify.out" '^[0-9]+ STOPPING=1$' 5
tap_result $? "SIGTERM: STOPPING=1"
wait "$DPID"
rc=$?
DPID=
tap_is "$rc" "0" "dsparkd exits 0"
kill "$RPID" 2>/dev/null
wait "$RPID"
RPID=

# start_case NAME DEVICES START_TIMEOUT [VAR=VALUE]...: dsparkd with its own
# configuration, workers in $T/w-NAME, log in $T/NAME.log and a receiver of
# its notifications writing $T/NAME.out; the assignments go to its environment
start_case() {
    _c=$1
    _devices=$2
    _start_timeout=$3
    shift 3
    NOUT="$T/$_c.out"
    DLOG="$T/$_c.log"
    mkdir -p "$T/w-$_c"
    cat >"$T/$_c.conf" <<EOF
[dsparkd]
status_interval = 200ms
[database]
dsn = "$DSPARK_DSN"
[events]
endpoint = ipc://$T/$_c-events.sock
[worker]
program = $DS_SRCDIR/tests/integration/fake-worker.sh
devices = $_devices
start_timeout = $_start_timeout
restart_delay = 100ms
restart_delay_max = 300ms
EOF
    "$RECV" "$T/$_c.sock" 60 >"$NOUT" 2>&1 &
    RPID=$!
    _n=0
    while [ ! -S "$T/$_c.sock" ] && [ $_n -lt 50 ]; do sleep 0.1; _n=$((_n + 1)); done
    env NOTIFY_SOCKET="$T/$_c.sock" FAKE_WORKER_DIR="$T/w-$_c" "$@" \
        "$DSPARKD" --config "$T/$_c.conf" 2>"$DLOG" &
    DPID=$!
}
stop_case() {
    kill -TERM "$DPID"
    wait "$DPID"
    DPID=
    kill "$RPID" 2>/dev/null
    wait "$RPID"
    RPID=
}

# two workers, device 0 still loading and never failed: READY=1 waits for it
# even though device 1 is ready
start_case slow 0-1 1min FAKE_WORKER_GATE="$T/go-slow" FAKE_WORKER_GATE_DEVICE=0
wait_for "$T/slow.out" "STATUS=starting: 1 of 2 workers ready" 10
tap_result $? "two workers, one still loading: STATUS= counts the ready one"
sleep 2
tap_is "$(count "$T/slow.out" '^[0-9]+ READY=1$')" "0" \
    "no READY=1 while a worker that has not failed is still loading, though the other is ready"
touch "$T/go-slow"
wait_for "$T/slow.out" '^[0-9]+ READY=1$' 10
tap_result $? "READY=1 once the slow worker is ready too"
tap_like "$(cat "$T/slow.log")" "^<6>ready: 2 workers, events on " "... logged as ready with both workers"
stop_case

# two healthy workers: READY=1, nothing said about workers that are not ready
start_case healthy 0-1 1min
wait_for "$T/healthy.out" '^[0-9]+ READY=1$' 10
tap_result $? "two healthy workers: READY=1"
wait_for "$T/healthy.out" '^[0-9]+ STATUS=[0-9]+ queued, [0-9]+ running, 2/2 workers, [0-9.]+ tokens/s$' 5
tap_result $? "... and STATUS= in its normal form"
tap_is "$(count "$T/healthy.out" 'not ready')" "0" "... no STATUS= mentions a worker that is not ready"
tap_is "$(count "$T/healthy.log" 'not ready')" "0" "... nor does the log"
stop_case

# device 0 cannot get ready (held back until go-broken exists) and is killed
# after worker.start_timeout: dsparkd gets ready with device 1 once device 0
# has failed, and keeps restarting device 0
start_case broken 0-1 1s FAKE_WORKER_GATE="$T/go-broken" FAKE_WORKER_GATE_DEVICE=0
wait_for "$T/broken.out" '^[0-9]+ READY=1$' 10
tap_result $? "one of two workers does not get ready: READY=1 all the same"
kl=$(grep -n "worker for device '0' (pid [0-9]*) was terminated by signal 9 (killed by dsparkd)" "$T/broken.log" |
    head -n 1 | cut -d: -f1)
rl=$(grep -n "ready: 1 of 2 workers" "$T/broken.log" | head -n 1 | cut -d: -f1)
tap_result $([ -n "$kl" ] && [ -n "$rl" ] && [ "$kl" -lt "$rl" ]; echo $?) \
    "... only after that worker was killed for worker.start_timeout (log lines $kl, $rl)"
tap_like "$(cat "$T/broken.log")" \
    "^<4>ready: 1 of 2 workers, events on '[^']*'; not ready: device '0' \\(failed 1 time, restarting" \
    "... with a warning naming the device that is not ready"
wait_for "$T/broken.out" \
    '^[0-9]+ STATUS=[0-9]+ queued, [0-9]+ running, 1/2 workers, [0-9.]+ tokens/s; not ready: device 0$' 5
tap_result $? "STATUS= names the device that is not ready"
n=0
while [ "$(grep -c '^start' "$T/w-broken/0.log")" -lt 3 ] && [ $n -lt 60 ]; do sleep 0.1; n=$((n + 1)); done
tap_result $([ "$(grep -c '^start' "$T/w-broken/0.log")" -ge 3 ]; echo $?) \
    "the failing worker keeps being restarted after READY=1"
touch "$T/go-broken"
wait_for "$T/broken.log" "worker for device '0' \\(pid [0-9]+\\) is ready" 5
tap_result $? "the failing worker gets ready once it can"
wait_for "$T/broken.out" '^[0-9]+ STATUS=[0-9]+ queued, [0-9]+ running, 2/2 workers, [0-9.]+ tokens/s$' 5
tap_result $? "... and STATUS= is back to its normal form"
tap_like "$(cat "$T/broken.log")" "^<5>all 2 workers are ready$" "... and the log says that all workers are ready"
tap_is "$(count "$T/broken.out" '^[0-9]+ READY=1$')" "1" "READY=1 went out once"
stop_case

tap_done
