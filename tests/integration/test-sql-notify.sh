#!/bin/sh
# test-sql-notify.sh: job notifications are batched: one NOTIFY per statement
# on 'dspark_events' with comma-separated ids (split into payloads of at most
# about 7000 bytes), never one per row, and none for updates that change no
# state (heartbeats); inserts notify the new ids the same way.
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
# the ids of payloads, one per line
ids_of() {
    tr ',' '\n' <"$1" | grep .
}

listen_run "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'p' || g FROM generate_series(1, 1000) g" >"$T/ins"
n=$(grep -c . "$T/ins")
tap_ok "inserting 1000 jobs in one statement sends a handful of notifications ($n)" test "$n" -ge 1 -a "$n" -le 3
tap_is "$(ids_of "$T/ins" | sort -n | uniq | wc -l | tr -d ' ')" 1000 "... naming every new job once"

listen_run "SELECT count(*) FROM dspark.claim_jobs('w', 1000, NULL, 60)" >"$T/claim"
n=$(grep -c . "$T/claim")
tap_ok "claiming 1000 jobs (a 1000-row update) sends a handful of notifications ($n), not 1000" test "$n" -ge 1 -a "$n" -le 3
tap_is "$(ids_of "$T/claim" | sort -n | uniq | wc -l | tr -d ' ')" 1000 "... naming every claimed job once"
tap_is "$(ids_of "$T/claim" | sort -n | head -n 1)-$(ids_of "$T/claim" | sort -n | tail -n 1)" \
    "$(q 'SELECT min(id) || $$-$$ || max(id) FROM dspark.jobs')" "... with the right ids"

listen_run "SELECT count(*) FROM dspark.heartbeat('w', (SELECT array_agg(id) FROM dspark.jobs), (SELECT array_agg(1) FROM dspark.jobs), 60)" >"$T/hb"
tap_is "$(grep -c . "$T/hb")" 0 "a heartbeat (no state change) sends no notification"

# a long list is split into several payloads under 8000 bytes
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'x' FROM generate_series(1, 4000)" >/dev/null
listen_run "SELECT count(*) FROM dspark.claim_jobs('w', 4000, NULL, 60)" >"$T/big"
n=$(grep -c . "$T/big")
tap_ok "4000 claimed ids are split over several notifications ($n)" test "$n" -ge 3 -a "$n" -le 6
tap_is "$(awk 'length($0) > 7100' "$T/big" | wc -l | tr -d ' ')" 0 "... each payload at most about 7000 bytes"
tap_is "$(ids_of "$T/big" | sort -n | uniq | wc -l | tr -d ' ')" 4000 "... together naming every job once"

listen_run "SELECT count(*) FROM dspark.finish_jobs('w', (SELECT json_agg(json_build_object('id', id, 'attempt', attempt, 'state', 'succeeded', 'output_text', 'o'))::jsonb FROM dspark.jobs WHERE state = 'running'))" >"$T/fin"
n=$(grep -c . "$T/fin")
tap_ok "a write-back of 5000 jobs sends a handful of notifications ($n)" test "$n" -ge 1 -a "$n" -le 8
tap_is "$(ids_of "$T/fin" | sort -n | uniq | wc -l | tr -d ' ')" 5000 "... naming every finished job"

id=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'x') RETURNING id")
listen_run "SELECT count(*) FROM dspark.cancel_jobs(ARRAY[$id]::bigint[])" >"$T/cancel"
tap_is "$(cat "$T/cancel")" "$id" "cancelling one job notifies exactly its id"
listen_run "SELECT count(*) FROM dspark.cancel_jobs(ARRAY[$id]::bigint[])" >"$T/cancel2"
tap_is "$(grep -c . "$T/cancel2")" 0 "a cancel that changes nothing notifies nothing"
tap_is "$(grep -c 'x\|o\|m' "$T/claim" "$T/fin" "$T/ins" | awk -F: '{s += $2} END {print s}')" 0 \
    "payloads carry ids only, never prompts or outputs"

tap_done
