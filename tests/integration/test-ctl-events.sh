#!/bin/sh
# test-ctl-events.sh: dsparkctl wait/watch take their hints from dsparkd's
# ZeroMQ events when a publisher answers (here a real dsparkd with one fake
# worker), and fall back to PostgreSQL notifications when none does. Then a
# dsparkd publishing on tcp with CURVE: a client with a key pair on its
# allow-list gets the events, others fall back; bad key options and files are
# refused before anything starts.
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

# a retry between two of watch's reads (the lease ended, the job requeued and claimed again, in one transaction):
# watch prints the new attempt, though the state is running again (it once compared the state alone)
id=$("$C" submit -m m "retried")
q "SELECT id FROM dspark.claim_jobs('w0', 1, NULL, 600)" >/dev/null
"$C" watch --events "$EP" --interval 60 --timeout 30 "$id" >"$T/retry.out" 2>"$T/retry.err" &
wpid=$!
n=0
while [ $n -lt 100 ] && ! grep -q "^job $id: running" "$T/retry.out" 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
psql -X -q -c "BEGIN" -c "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $id" \
    -c "SELECT dspark.requeue_expired()" -c "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 600)" -c "COMMIT" \
    >/dev/null
n=0
while [ $n -lt 100 ] && ! grep -q "^job $id: running (attempt 2" "$T/retry.out" 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
q "SELECT count(*) FROM dspark.finish_jobs('w1', '[{\"id\": $id, \"attempt\": 2, \"state\": \"succeeded\", \"output_text\": \"ok\"}]')" >/dev/null
wait $wpid
tap_is "$?|$(grep -c "^job $id: running" "$T/retry.out")|$(grep -c "^job $id: running (attempt 2, worker w1)$" "$T/retry.out")" \
    "0|2|1" "watch prints a retry's new attempt when its requeue and new claim fall between two reads"

# dsparkd restarts while watch runs: the claim made while none published (an event nobody sent) is seen
# once the new dsparkd answers watch's subscriptions again, not at the 60 s poll
id=$("$C" submit -m m "across a restart")
"$C" watch -v --events "$EP" --interval 60 --timeout 60 "$id" >"$T/rwatch.out" 2>"$T/rwatch.err" &
wpid=$!
n=0
while [ $n -lt 100 ] && ! grep -q "job $id: queued" "$T/rwatch.out" 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
kill -TERM "$DPID"
wait "$DPID"
q "SELECT id FROM dspark.claim_jobs('w0', 1, NULL, 600)" >/dev/null
start=$(date +%s)
FAKE_WORKER_DIR="$T/w" "$DSPARKD" --config "$T/dspark.conf" 2>"$T/dsparkd2.log" &
DPID=$!
n=0
while [ $n -lt 300 ] && ! grep -q "^job $id: running" "$T/rwatch.out" 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
took=$(($(date +%s) - start))
tap_is "$(grep -c "^job $id: running (attempt 1, worker w0)$" "$T/rwatch.out")" 1 \
    "watch sees a claim made while dsparkd was down once the new dsparkd answers its subscription (${took}s)"
q "SELECT count(*) FROM dspark.finish_jobs('w0', '[{\"id\": $id, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"ok\"}]')" >/dev/null
wait $wpid
tap_is "$?" 0 "... and returns when the job succeeds"

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

# ---- CURVE ----
kill -TERM "$DPID"
wait "$DPID"
DPID=
"$C" keygen -o "$T/alice.key"
tap_is "$?" 0 "keygen -o writes a key pair"
tap_is "$(grep -c '^public-key = "[^"]\{40\}"$' "$T/alice.key") $(grep -c '^secret-key = "[^"]\{40\}"$' "$T/alice.key")" \
    "1 1" "... with a public-key and a secret-key line"
tap_is "$(stat -c %a "$T/alice.key")" 600 "... readable by its owner only"
"$C" keygen -o "$T/alice.key" 2>"$T/keygen.err"
tap_is "$?" 1 "keygen -o refuses to overwrite a file"
tap_like "$(cat "$T/keygen.err")" "could not create '$T/alice.key'" "... naming it"
"$DSPARKD" --curve-keypair >"$T/server.key"
"$DSPARKD" --curve-keypair >"$T/bob.key"
spub=$(sed -n 's/^public-key = "\(.*\)"$/\1/p' "$T/server.key")
printf '%s\n' "$spub" >"$T/server.pub"
grep '^public-key' "$T/alice.key" >"$T/allow"
cat >"$T/curve.conf" <<CONF
[dsparkd]
host_name = ctlhost
status_interval = 200ms

[database]
dsn = "$DSPARK_DSN"

[events]
endpoint = tcp://127.0.0.1:*
heartbeat_interval = 200ms
curve_secret_key_file = $T/server.key
curve_allow_file = $T/allow
CONF
"$DSPARKD" --config "$T/curve.conf" 2>"$T/curve.log" &
DPID=$!
n=0
while [ $n -lt 150 ] && ! grep -q 'ready' "$T/curve.log" 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
port=$(sed -n "s/.*ready: .*events on 'tcp:\\/\\/127.0.0.1:\\([0-9]*\\)'.*/\\1/p" "$T/curve.log")
tap_like "$port" '^[0-9]+$' "dsparkd publishes on tcp://127.0.0.1 with CURVE"
TEP="tcp://127.0.0.1:$port"

id=$("$C" submit -m m "curve wait")
finish_later 1
start=$(date +%s)
"$C" wait -v --events "$TEP" --events-server-key "$T/server.key" --events-key "$T/alice.key" \
    --interval 60 --timeout 30 "$id" >/dev/null 2>"$T/curve-wait.err"
rc=$?
took=$(($(date +%s) - start))
wait $bg
tap_is "$rc" 0 "wait with CURVE keys on the allow-list returns when the job succeeds"
tap_like "$(cat "$T/curve-wait.err")" "hints from ZeroMQ events at $TEP \\(CURVE\\)" "... with hints from CURVE events"
tap_ok "... promptly (took ${took}s)" test "$took" -lt 15

id=$("$C" submit -m m "curve watch")
finish_later 1
DSPARK_EVENTS=$TEP DSPARK_EVENTS_SERVER_KEY=$T/server.pub DSPARK_EVENTS_KEY=$T/alice.key \
    "$C" watch -v --interval 60 --timeout 30 "$id" >"$T/curve-watch.out" 2>"$T/curve-watch.err"
rc=$?
wait $bg
tap_is "$rc" 0 "watch with the keys from the environment (server key a bare key file)"
tap_like "$(cat "$T/curve-watch.err")" "hints from ZeroMQ events at $TEP \\(CURVE\\)" "... with hints from CURVE events"
tap_like "$(cat "$T/curve-watch.out")" "job $id: succeeded" "... and saw the success"

id=$("$C" submit -m m "refused key")
finish_later 1
"$C" wait -v --events "$TEP" --events-server-key "$spub" --events-key "$T/bob.key" \
    --interval 60 --timeout 30 "$id" >/dev/null 2>"$T/bob.err"
rc=$?
wait $bg
tap_is "$rc" 0 "wait with a key not on the allow-list still finishes"
tap_like "$(cat "$T/bob.err")" "no ZeroMQ events \\(no event publisher answered at '$TEP'.*allow-list" \
    "... warning that the publisher did not answer, pointing at the allow-list"
tap_like "$(cat "$T/bob.err")" "hints from PostgreSQL notifications" "... and using LISTEN instead"
tap_ok "... and never claiming ZeroMQ hints" sh -c "! grep -q 'hints from ZeroMQ' '$T/bob.err'"

id=$("$C" submit -m m "no curve")
finish_later 1
"$C" wait -v --events "$TEP" --interval 60 --timeout 30 "$id" >/dev/null 2>"$T/plain.err"
rc=$?
wait $bg
tap_is "$rc" 0 "wait without CURVE against the CURVE publisher still finishes"
tap_like "$(cat "$T/plain.err")" "hints from PostgreSQL notifications" "... over LISTEN: the publisher refused it"

"$C" wait --events "$TEP" --events-server-key "$T/server.key" 1 >"$T/u1.out" 2>"$T/u1.err"
tap_is "$?" 2 "a server key without a client key pair is a usage error"
tap_like "$(cat "$T/u1.err")" "--events-server-key needs this client's CURVE key pair: give --events-key FILE" "... saying what is missing"
DSPARK_EVENTS_SERVER_KEY=$T/server.key "$C" watch --events "$TEP" 1 >/dev/null 2>"$T/u2.err"
tap_is "$?" 2 "... also from the environment"
tap_like "$(cat "$T/u2.err")" "DSPARK_EVENTS_SERVER_KEY needs this client's CURVE key pair" "... naming the variable"
"$C" wait --events "$TEP" --events-key "$T/alice.key" 1 >/dev/null 2>"$T/u3.err"
tap_is "$?" 2 "a client key without a server key is a usage error"
tap_like "$(cat "$T/u3.err")" "--events-key needs dsparkd's public key" "... saying what is missing"
"$C" wait --events "$TEP" --events-server-key "$T/server.key" --events-key "$T/missing.key" 1 \
    >/dev/null 2>"$T/k1.err"
tap_is "$?" 1 "a missing key file is an error"
tap_like "$(cat "$T/k1.err")" "could not open key file '$T/missing.key'" "... naming the file"
printf 'public-key = "short"\n' >"$T/bad.key"
"$C" wait --events "$TEP" --events-server-key "$T/bad.key" --events-key "$T/alice.key" 1 \
    >/dev/null 2>"$T/k2.err"
tap_is "$?" 1 "a malformed server key file is an error"
tap_like "$(cat "$T/k2.err")" "key file '$T/bad.key' line 1: expected a 40-character Z85 key" "... naming the file and line"
"$C" wait --events "$TEP" --events-server-key "$T/server.key" --events-key "$T/server.pub" 1 \
    >/dev/null 2>"$T/k3.err"
tap_is "$?" 1 "a client key file of one bare key is an error"
tap_like "$(cat "$T/k3.err")" "key file '$T/server.pub' holds no key pair" "... naming the file"
grep '^public-key' "$T/alice.key" >"$T/pubonly.key"
"$C" wait --events "$TEP" --events-server-key "$T/server.key" --events-key "$T/pubonly.key" 1 \
    >/dev/null 2>"$T/k4.err"
tap_is "$?" 1 "a client key file without a secret key is an error"
tap_like "$(cat "$T/k4.err")" "key file '$T/pubonly.key' holds no 'secret-key'" "... naming the file"
id=$("$C" submit -m m "polling ignores keys")
"$C" cancel "$id" >/dev/null
DSPARK_EVENTS_SERVER_KEY=$T/server.key "$C" wait --poll "$id" >/dev/null 2>"$T/poll.err"
tap_is "$?" 3 "--poll does not need the CURVE keys (a cancelled job: exit 3)"
tap_done
