#!/bin/sh
# test-sql-notify.sh: job notifications are batched: one NOTIFY per statement
# on 'dspark_events' with one comma-separated entry per changed job,
# "id:version:state:attempt" (state as its first letter; split into payloads of
# at most about 7000 bytes), never one per row, and none for updates that change
# no state (heartbeats); inserts notify the new jobs the same way, and so do
# cancellations and ad-hoc updates. A transaction that changes one job several
# times notifies every change.
. "${DS_SRCDIR:-$(dirname "$0")/../..}/tests/integration/pg-harness.sh"
pg_harness_start
pg_harness_init
T=$PGH_DIR

# listen_run SQL: run SQL in a session that LISTENs; print one payload per line.
listen_run() {
    printf '%s;\n' "$1" >"$T/stmt.sql"
    psql -X -q -A -t -c "LISTEN dspark_events" -f "$T/stmt.sql" 2>&1 |
        sed -n 's/^Asynchronous notification "dspark_events" with payload "\(.*\)" received from server process with PID [0-9]*\.$/\1/p'
}
# the entries of payloads, one per line
entries_of() {
    tr ',' '\n' <"$1" | grep .
}
# the ids of payloads, one per line
ids_of() {
    entries_of "$1" | cut -d: -f1
}
# entries_not FILE VERSION STATE ATTEMPT: how many entries of FILE are not
# "id:VERSION:STATE:ATTEMPT"
entries_not() {
    entries_of "$1" | grep -Evc "^[0-9]+:$2:$3:$4\$"
}

listen_run "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'p' || g FROM generate_series(1, 1000) g" >"$T/ins"
n=$(grep -c . "$T/ins")
tap_ok "inserting 1000 jobs in one statement sends a handful of notifications ($n)" test "$n" -ge 1 -a "$n" -le 3
tap_is "$(ids_of "$T/ins" | sort -n | uniq | wc -l | tr -d ' ')" 1000 "... naming every new job once"
tap_is "$(entries_of "$T/ins" | wc -l | tr -d ' ')" 1000 "... in one entry each"
tap_is "$(entries_not "$T/ins" 1 q 0)" 0 "... each 'id:1:q:0' (version 1, queued, attempt 0)"

listen_run "SELECT count(*) FROM dspark.claim_jobs('w', 1000, NULL, 60)" >"$T/claim"
n=$(grep -c . "$T/claim")
tap_ok "claiming 1000 jobs (a 1000-row update) sends a handful of notifications ($n), not 1000" test "$n" -ge 1 -a "$n" -le 3
tap_is "$(ids_of "$T/claim" | sort -n | uniq | wc -l | tr -d ' ')" 1000 "... naming every claimed job once"
tap_is "$(ids_of "$T/claim" | sort -n | head -n 1)-$(ids_of "$T/claim" | sort -n | tail -n 1)" \
    "$(q 'SELECT min(id) || $$-$$ || max(id) FROM dspark.jobs')" "... with the right ids"
tap_is "$(entries_not "$T/claim" 2 r 1)" 0 "... each 'id:2:r:1' (version 2, running, attempt 1)"

listen_run "SELECT count(*) FROM dspark.heartbeat('w', (SELECT array_agg(id) FROM dspark.jobs), (SELECT array_agg(1) FROM dspark.jobs), 60)" >"$T/hb"
tap_is "$(grep -c . "$T/hb")" 0 "a heartbeat (no state change) sends no notification"

# a long list is split into several payloads under 8000 bytes
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'x' FROM generate_series(1, 4000)" >/dev/null
listen_run "SELECT count(*) FROM dspark.claim_jobs('w', 4000, NULL, 60)" >"$T/big"
n=$(grep -c . "$T/big")
bytes=$(entries_of "$T/big" | wc -c | tr -d ' ')
tap_ok "4000 claimed jobs ($bytes bytes of entries) are split over several notifications ($n)" \
    test "$n" -ge $((bytes / 7100 + 1)) -a "$n" -le $((bytes / 6000 + 2))
tap_is "$(awk 'length($0) > 7100' "$T/big" | wc -l | tr -d ' ')" 0 "... each payload at most about 7000 bytes"
tap_is "$(awk 'length($0) < 6000' "$T/big" | wc -l | tr -d ' ')" 1 "... all but the last filled to about 7000 bytes"
tap_is "$(ids_of "$T/big" | sort -n | uniq | wc -l | tr -d ' ')" 4000 "... together naming every job once"

listen_run "SELECT count(*) FROM dspark.finish_jobs('w', (SELECT json_agg(json_build_object('id', id, 'attempt', attempt, 'state', 'succeeded', 'output_text', 'o'))::jsonb FROM dspark.jobs WHERE state = 'running'))" >"$T/fin"
n=$(grep -c . "$T/fin")
tap_ok "a write-back of 5000 jobs sends a handful of notifications ($n)" test "$n" -ge 1 -a "$n" -le 12
tap_is "$(ids_of "$T/fin" | sort -n | uniq | wc -l | tr -d ' ')" 5000 "... naming every finished job"
entries_of "$T/fin" | sort >"$T/fin.entries"
q "SELECT id || ':' || version || ':s:' || attempt FROM dspark.jobs WHERE state = 'succeeded'" | sort >"$T/fin.rows"
tap_ok "... each 'id:version:s:1' with the row's new version (3, or 4 after the heartbeat)" \
    cmp "$T/fin.entries" "$T/fin.rows"
tap_is "$(entries_not "$T/fin" '[34]' s 1)" 0 "... (succeeded, attempt 1)"

id=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'x') RETURNING id")
listen_run "SELECT count(*) FROM dspark.cancel_jobs(ARRAY[$id]::bigint[])" >"$T/cancel"
tap_is "$(cat "$T/cancel")" "$id:2:c:0" "cancelling a queued job notifies exactly its change: 'id:2:c:0'"
listen_run "SELECT count(*) FROM dspark.cancel_jobs(ARRAY[$id]::bigint[])" >"$T/cancel2"
tap_is "$(grep -c . "$T/cancel2")" 0 "a cancel that changes nothing notifies nothing"
tap_is "$(grep -c 'x\|o\|m' "$T/claim" "$T/fin" "$T/ins" | awk -F: '{s += $2} END {print s}')" 0 \
    "payloads carry ids, versions, states and attempts only, never prompts or outputs"

# ad-hoc SQL: each state change it makes is notified, with the trigger's version
ids=$(q "INSERT INTO dspark.jobs (model, prompt) SELECT 'adhoc', 'x' FROM generate_series(1, 3) RETURNING id" | tr '\n' ' ')
listen_run "UPDATE dspark.jobs SET cancel_requested = true WHERE model = 'adhoc'" >"$T/adhoc"
tap_is "$(grep -c . "$T/adhoc")" 1 "an ad-hoc UPDATE cancelling three queued jobs sends one notification"
tap_is "$(entries_of "$T/adhoc" | sort | tr '\n' ' ')" "$(for i in $ids; do printf '%s:2:c:0 ' "$i"; done)" \
    "... naming each: 'id:2:c:0'"
listen_run "UPDATE dspark.jobs SET priority = 5 WHERE model = 'adhoc'" >"$T/adhoc2"
tap_is "$(grep -c . "$T/adhoc2")" 0 "an ad-hoc UPDATE that changes no state notifies nothing"
ja=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('adhoc2', 'x') RETURNING id")
listen_run "UPDATE dspark.jobs SET state = 'failed', error = 'by hand' WHERE id = $ja" >"$T/adhoc3"
tap_is "$(cat "$T/adhoc3")" "$ja:2:f:0" "an ad-hoc UPDATE failing a queued job notifies 'id:2:f:0'"

# a large ad-hoc update: payloads of about 7000 bytes, not one per row
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'bulk', 'x' FROM generate_series(1, 3000)" >/dev/null
listen_run "UPDATE dspark.jobs SET cancel_requested = true WHERE model = 'bulk'" >"$T/bulk"
n=$(grep -c . "$T/bulk")
tap_ok "an ad-hoc UPDATE cancelling 3000 jobs sends a handful of notifications ($n)" test "$n" -ge 2 -a "$n" -le 8
tap_is "$(awk 'length($0) > 7000' "$T/bulk" | wc -l | tr -d ' ')" 0 "... each at most 7000 bytes"
tap_is "$(ids_of "$T/bulk" | sort -n | uniq | wc -l | tr -d ' ')" 3000 "... together naming every job once"
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'bulk2', 'x' FROM generate_series(1, 10)" >/dev/null
tap_is "$(q "BEGIN; UPDATE dspark.jobs SET cancel_requested = true WHERE model = 'bulk2';
             SELECT coalesce(current_setting('dspark.job_changes', true), '') = ''; COMMIT")" t \
    "after an ad-hoc update statement nothing is left waiting to be sent"

# a requeue: the lease expires, the reaper requeues (attempt kept)
j=$(q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('rq', 'x', 1000) RETURNING id")
q "SELECT count(*) FROM dspark.claim_jobs('w', 1, NULL, 1, ARRAY['rq'])" >/dev/null
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s', version = version + 1 WHERE id = $j" >/dev/null
listen_run "SELECT dspark.requeue_expired()" >"$T/requeue"
tap_is "$(cat "$T/requeue")" "$j:4:q:1" "a requeue by the reaper notifies 'id:4:q:1' (queued, attempt kept)"

# one transaction: insert, claim, heartbeat, failure; every state change is
# notified (the payloads differ: PostgreSQL folds identical ones of a transaction)
listen_run "BEGIN;
INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('tx', 'x', 1000);
SELECT count(*) FROM dspark.claim_jobs('w', 1, NULL, 60, ARRAY['tx']);
SELECT count(*) FROM dspark.heartbeat('w', ARRAY(SELECT id FROM dspark.jobs WHERE model = 'tx'), ARRAY[1], 60);
SELECT count(*) FROM dspark.finish_jobs('w', (SELECT jsonb_agg(jsonb_build_object('id', id, 'attempt', 1,
    'state', 'failed', 'error', 'e')) FROM dspark.jobs WHERE model = 'tx'));
COMMIT" >"$T/tx"
jt=$(q "SELECT id FROM dspark.jobs WHERE model = 'tx'")
tap_is "$(tr '\n' ' ' <"$T/tx")" "$jt:1:q:0 $jt:2:r:1 $jt:4:f:1 " \
    "insert, claim, heartbeat and failure in one transaction: the three state changes, in order"

tap_done
