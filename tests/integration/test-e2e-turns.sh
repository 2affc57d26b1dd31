#!/bin/sh
# test-e2e-turns.sh: the clients with jobs queued take turns (sql/014), through
# a real CPU worker. Two client roles queue jobs by plain SQL: alice 20, then
# bob 4 shorter ones. A worker that holds two jobs at a time runs them all;
# bob's four must start among the first jobs, not after alice's twenty as in
# submission order.
# Then the same with bob's jobs at a higher priority: they start first.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/e2e-lib.sh"
e2e_start

q "CREATE ROLE alice LOGIN IN ROLE dspark_client;
   CREATE ROLE bob LOGIN IN ROLE dspark_client" >/dev/null
# as ROLE N MAX_TOKENS [PRIORITY]: N jobs of the test model queued by ROLE
as() {
    psql -X -q -A -t -v ON_ERROR_STOP=1 -U "$1" -c "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature, priority)
        SELECT '$E2E_MODEL', ARRAY[g, g + 1, g + 2], $3, 0, ${4:-0} FROM generate_series(1, $2) g" >/dev/null
}
# run_all: one worker, two jobs at a time, until the queue is empty
run_all() {
    "$WORKER" --target "$E2E_TARGET" --draft "$E2E_DRAFT" --sps "$T/sps.json" --threads 1 --worker-id "$1" \
        --max-batch 2 --concurrency 2 --once --log-level debug 2>"$T/$1.log"
}
# alice_before_last_of ROLE: how many of alice's jobs started before ROLE's last one did
alice_before_last_of() {
    q "SELECT count(*) FROM dspark.jobs a
       WHERE a.owner = 'alice' AND a.started_at < (SELECT max(b.started_at) FROM dspark.jobs b WHERE b.owner = '$1')"
}

# jobs of different lengths, so that the two slots come free at different
# times and most claims take one job
as alice 20 40
as bob 4 8
run_all turns
tap_is "$?" 0 "a worker runs both clients' jobs and exits when the queue is empty"
tap_is "$(q "SELECT string_agg(owner || ':' || n, ' ' ORDER BY owner) FROM (SELECT owner, count(*) AS n FROM dspark.jobs
             WHERE state = 'succeeded' GROUP BY owner) s")" "alice:20 bob:4" "... every job succeeded"
n=$(alice_before_last_of bob)
tap_ok "bob's four jobs start among the first, taking turns with alice's twenty ($n of alice's started before bob's last)" \
    test "$n" -le 8
tap_is "$(q "SELECT string_agg(owner, ',' ORDER BY started_at, id) FROM (SELECT owner, started_at, id FROM dspark.jobs
             ORDER BY started_at, id LIMIT 2) s")" "alice,bob" "... the worker's first claim took one job of each"
tap_like "$(cat "$T/turns.log")" "notifications arrive: the probe came back" \
    "... and, connected directly, its notification probe came back"

q "DELETE FROM dspark.jobs" >/dev/null
as alice 10 24
as bob 3 24 5
run_all priorities
tap_is "$(alice_before_last_of bob)" "0" "a client's jobs of a higher priority all start before another's of a lower one"

tap_done
