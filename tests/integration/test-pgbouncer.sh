#!/bin/sh
# test-pgbouncer.sh: clients and workers through PgBouncer in transaction
# pooling mode (the mode that many sites put in front of PostgreSQL), which
# gives each transaction whatever server session is free: no session state,
# no LISTEN. Through it: the schema is created and migrated (two runs at once
# included, each migration applied once, no advisory lock left behind);
# dsparkctl submits, reads, waits and cancels; a real CPU worker claims, runs
# and writes back jobs (its LISTEN is not served, so it finds work by polling,
# and says so);
# dsparkd, which needs notifications, refuses to run on such a connection.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/e2e-lib.sh"
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$PGBOUNCER" ] || tap_skip_all "pgbouncer not installed (./setup.sh installs it)"
e2e_start

# PgBouncer on a unix socket beside the server's, run as the cluster's owner
B=$T/pgbouncer
mkdir -p "$B"
echo '"postgres" ""' >"$B/users.txt"
cat >"$B/pgbouncer.ini" <<EOF
[databases]
dspark_session = host=$PGH_DIR port=5432 dbname=dspark pool_mode=session
* = host=$PGH_DIR port=5432
[pgbouncer]
listen_addr =
unix_socket_dir = $B
listen_port = 6432
auth_type = trust
auth_file = $B/users.txt
pool_mode = transaction
default_pool_size = 3
max_client_conn = 50
logfile = $B/pgbouncer.log
pidfile = $B/pgbouncer.pid
EOF
[ -n "$PGH_RUNAS" ] && chown -R "$PGH_RUNAS" "$T" "$B"
pg_harness_as_owner "$PGBOUNCER" -d "$B/pgbouncer.ini" >"$B/start.log" 2>&1 ||
    { echo "Bail out! pgbouncer did not start"; sed 's/^/# /' "$B/start.log"; exit 1; }
stop_pgbouncer() {
    [ -f "$B/pgbouncer.pid" ] && kill "$(cat "$B/pgbouncer.pid")" 2>/dev/null
}
via() { # DATABASE: the connection string through PgBouncer
    echo "host=$B port=6432 user=postgres dbname=$1"
}
PGB=$(via dspark)
C="$DSPARKCTL"

# --- the schema ------------------------------------------------------------------
q "CREATE DATABASE fresh" >/dev/null
q "CREATE DATABASE racing" >/dev/null
out=$("$C" -d "$(via fresh)" db init 2>&1)
tap_is "$?" 0 "db init through PgBouncer (transaction pooling)"
tap_like "$out" "created schema version" "... creates the schema"
tap_is "$(race_migrate "$(via racing)")" 00 "two db migrate at once through PgBouncer both succeed"
tap_is "$(psql -X -A -t -d racing -c 'SELECT count(*) = count(DISTINCT version) AND max(version) = count(*) FROM dspark.schema_version')" "t" \
    "... and applied each migration once"
tap_is "$(q "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")" "0" "... leaving no advisory lock held in a pooled session"

# --- clients --------------------------------------------------------------------
id=$("$C" -d "$PGB" submit -m "$E2E_MODEL" --max-tokens 8 --delay '1 hour' "later")
tap_is "$?" 0 "dsparkctl submit through PgBouncer"
psql -X -q -d "$PGB" -c "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature)
    SELECT '$E2E_MODEL', ARRAY[g, g + 1, g + 2], 16, 0 FROM generate_series(1, 12) g" >/dev/null
tap_is "$?" 0 "jobs inserted by plain SQL through PgBouncer"
"$C" -d "$PGB" --json status >"$T/status.json"
tap_py "dsparkctl status through PgBouncer" "d['jobs']['queued'] == 13 and d['jobs']['delayed'] == 1" "$T/status.json"
tap_is "$("$C" -d "$PGB" cancel "$id" >/dev/null 2>&1; echo $?)" 0 "dsparkctl cancel through PgBouncer"

# --- a worker ---------------------------------------------------------------------
"$WORKER" --dsn "$PGB" --target "$E2E_TARGET" --draft "$E2E_DRAFT" --sps "$T/sps.json" --threads 1 \
    --worker-id pooled --poll-interval 0.2 --max-batch 4 2>"$T/worker.log" &
WPID=$!
E2E_PIDS="$E2E_PIDS $WPID"
wait_sql "SELECT count(*) FROM dspark.jobs WHERE state = 'succeeded'" 12 60
tap_result $? "a worker through PgBouncer runs the jobs"
# a job queued after the worker went idle: no notification reaches it, its poll finds the job
psql -X -q -d "$PGB" -c "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature, custom_id)
    VALUES ('$E2E_MODEL', ARRAY[5, 6, 7], 8, 0, 'after-idle')" >/dev/null
wait_sql "SELECT state FROM dspark.jobs WHERE custom_id = 'after-idle'" "succeeded" 30
tap_result $? "... and finds a job queued after it went idle"
tap_is "$(q "SELECT count(*) FROM dspark.job_stats s JOIN dspark.jobs j ON j.id = s.job_id WHERE j.worker_id = 'pooled'")" "13" \
    "... with a statistics row for each"
wait_for "$T/worker.log" "notifications do not arrive on this worker's database connection" 15
tap_result $? "... and warns that it finds new jobs by polling (its notification probe did not come back)"
ids=$(q "SELECT string_agg(id::text, ' ') FROM dspark.jobs WHERE state = 'succeeded'")
# shellcheck disable=SC2086
"$C" -d "$PGB" wait --interval 0.2 --timeout 20 $ids >/dev/null 2>&1
tap_is "$?" 0 "dsparkctl wait through PgBouncer"
"$C" -d "$PGB" results $ids >"$T/results.jsonl" 2>&1
tap_is "$(grep -c '"status_code": *200' "$T/results.jsonl")" 13 "dsparkctl results through PgBouncer"
kill -TERM "$WPID"
wait "$WPID"
tap_is "$?" 0 "the worker stops cleanly"
tap_is "$(q "SELECT state FROM dspark.workers WHERE worker_id = 'pooled'")" "stopped" "... and marks itself stopped"

# --- dsparkd ----------------------------------------------------------------------
write_conf "$T/dspark.conf" "" ""
sed -i "s|^dsn = .*|dsn = \"$PGB\"|" "$T/dspark.conf"
timeout 60 "$DSPARKD" --config "$T/dspark.conf" 2>"$T/dsparkd.log"
rc=$?
tap_is "$rc" 78 "dsparkd stops with a configuration error (78) when its notifications do not arrive"
tap_like "$(cat "$T/dsparkd.log")" "notifications do not arrive on dsparkd's database connection .*pool_mode = transaction" \
    "... after two probes, saying why and what to do"
tap_is "$(grep -c "ready:" "$T/dsparkd.log")" 0 "... without having reported itself ready"
# through the same PgBouncer in session mode, notifications arrive
sed -i "s|^dsn = .*|dsn = \"$(via dspark_session)\"|" "$T/dspark.conf"
start_dsparkd "$T/dspark.conf" "$T/dsparkd-session.log" 0
wait_for "$T/dsparkd-session.log" "notifications arrive: the probe came back" 15
tap_result $? "through a pooler in session mode, dsparkd's probe comes back"
stop_dsparkd
tap_is "$DRC" 0 "... and it runs and stops cleanly"

stop_pgbouncer
tap_done
