#!/bin/sh
# test-ctl-events.sh: dsparkctl wait/watch take their hints from dsparkd's
# ZeroMQ events when a publisher answers (here a real dsparkd with one fake
# worker), and fall back to PostgreSQL notifications when none does.
. "${DS_SRCDIR:-$(dirname "$0")/../..}/tests/integration/pg-harness.sh"
DSPARKD="$DS_BUILDDIR/dsparkd"
[ -x "$DSPARKD" ] || tap_skip_all "dsparkd not built"
pg_harness_start
pg_harness_init
T=$PGH_DIR
C=$DSPARKCTL
DPID=
trap '[ -n "$DPID" ] && kill -KILL "$DPID" 2>/dev/null; for f in "$T"/w/*.pid; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null; done; pg_harness_stop' EXIT

EP="ipc://$T/events.sock"
mkdir -p "$T/w"
cat >"$T/dspark.conf" <<CONF
[dsparkd]
host_name = ctlhost
status_interval = 200ms

[database]
dsn = "$DSPARK_DSN"

[events]
endpoint = $EP
heartbeat_interval = 200ms

[worker]
program = $DS_SRCDIR/tests/integration/fake-worker.sh
devices = 0
target = /models/target
draft = /models/draft
CONF
FAKE_WORKER_DIR="$T/w" "$DSPARKD" --config "$T/dspark.conf" 2>"$T/dsparkd.log" &
DPID=$!
n=0
while [ $n -lt 150 ] && ! grep -q 'ready' "$T/dsparkd.log" 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
tap_ok "dsparkd is up and publishing" grep -q ready "$T/dsparkd.log"

# finish_later SECONDS: claim the next job and finish it after a while
finish_later() {
    (sleep "$1"
     i=$(q "SELECT id FROM dspark.claim_jobs('w0', 1, NULL, 600)")
     sleep 0.5
     q "SELECT count(*) FROM dspark.finish_jobs('w0', '[{\"id\": $i, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"ok\"}]')" >/dev/null) &
    bg=$!
}

id=$("$C" submit -m m "over zeromq")
finish_later 1
start=$(date +%s)
"$C" watch -v --events "$EP" --interval 60 --timeout 30 "$id" >"$T/watch.out" 2>"$T/watch.err"
rc=$?
took=$(($(date +%s) - start))
wait $bg
tap_is "$rc" 0 "watch --events returns when the job succeeds"
tap_like "$(cat "$T/watch.err")" "hints from ZeroMQ events at $EP" "... listening to dsparkd's ZeroMQ events"
tap_ok "... woken by an event, not the 60 s poll (took ${took}s)" test "$took" -lt 15
tap_is "$(grep -c "^job $id: running (attempt 1, worker w0)$" "$T/watch.out")" 1 "... and saw the claim"
tap_like "$(cat "$T/watch.out")" "job $id: succeeded" "... and the success"

bid=$(printf '%s\n' '{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"model":"m","prompt":"x"}}' |
    "$C" submit -q -f -)
finish_later 1
start=$(date +%s)
DSPARK_EVENTS=$EP "$C" wait -v --batch "$bid" --interval 60 --timeout 30 >/dev/null 2>"$T/wait.err"
rc=$?
took=$(($(date +%s) - start))
wait $bg
tap_is "$rc" 0 "wait --batch with \$DSPARK_EVENTS returns when the batch is done"
tap_like "$(cat "$T/wait.err")" "hints from ZeroMQ events" "... using the batch's events"
tap_ok "... promptly (took ${took}s)" test "$took" -lt 15

id=$("$C" submit -m m "no publisher")
finish_later 1
"$C" wait -v --events "ipc://$T/nobody.sock" --interval 60 --timeout 30 "$id" >/dev/null 2>"$T/fallback.err"
rc=$?
wait $bg
tap_is "$rc" 0 "wait with an endpoint nobody serves still finishes"
tap_like "$(cat "$T/fallback.err")" "no ZeroMQ events \\(no event publisher answered" "... warning that no publisher answered"
tap_like "$(cat "$T/fallback.err")" "hints from PostgreSQL notifications" "... and using LISTEN instead"
tap_done
