#!/bin/sh
# test-e2e-scale.sh: dsparkd with two real CPU workers on 1,000 jobs: every job
# ends 'succeeded' exactly once, none is claimed twice (attempt 1, one
# statistics row each), both workers share the work, and the output of a job
# does not depend on the worker, on the jobs it shared rounds with, or on
# speculation (greedy speculative output equals target-only output); and a
# worker with a small KV pool claims as many jobs as fit in it.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/e2e-lib.sh"
e2e_start

write_conf "$T/dspark.conf" 0-1 "--lease 20"
start_dsparkd "$T/dspark.conf" "$T/dsparkd.log" 2
tap_result $? "dsparkd starts two real workers"
tap_is "$(q "SELECT string_agg(worker_id || ':' || state, ' ' ORDER BY worker_id) FROM dspark.workers")" \
    "testhost/0:running testhost/1:running" "both registered"

t0=$(date +%s)
# every 25th job is a copy of one prompt, half with speculation, half without
# (spread over the queue, so that both workers run some of them)
q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature, seed, spec_mode, custom_id)
   SELECT '$E2E_MODEL',
          CASE WHEN g % 25 = 0 THEN ARRAY[7, 8, 9, 10, 11]
               ELSE ARRAY(SELECT (g * 7 + k * 13) % 500 FROM generate_series(1, 3 + g % 8) k) END,
          CASE WHEN g % 25 = 0 THEN 24 ELSE 8 END, 0, g,
          CASE WHEN g % 50 = 0 THEN 'none' ELSE 'dspark' END,
          CASE WHEN g % 25 = 0 THEN 'same-' || g END
   FROM generate_series(1, 1000) g" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.jobs")" "1000" "1,000 jobs queued"
wait_sql "SELECT count(*) FROM dspark.jobs WHERE state IN ('queued', 'running')" 0 150
tap_result $? "all 1,000 jobs finish ($(($(date +%s) - t0)) s)"

tap_is "$(q "SELECT string_agg(state || ':' || n, ' ') FROM (SELECT state, count(*) n FROM dspark.jobs GROUP BY state) s")" \
    "succeeded:1000" "every job succeeded"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE attempt <> 1")" "0" "no job was claimed twice (attempt 1 everywhere)"
tap_is "$(q "SELECT count(*) || '|' || count(DISTINCT job_id) || '|' || count(*) FILTER (WHERE attempt = 1) FROM dspark.job_stats")" \
    "1000|1000|1000" "exactly one statistics row per job, all of attempt 1"
tap_is "$(q "SELECT count(*) FROM dspark.jobs j JOIN dspark.job_stats s ON s.job_id = j.id
             WHERE s.worker_id IS DISTINCT FROM j.worker_id OR s.output_tokens <> cardinality(j.output_ids)
                OR j.finished_at IS NULL OR j.started_at IS NULL")" "0" \
    "each row's worker, output and times agree with its statistics"
tap_is "$(q "SELECT count(*) FROM (SELECT worker_id FROM dspark.jobs GROUP BY worker_id HAVING count(*) >= 100) w")" "2" \
    "both workers ran a share of the jobs ($(q "SELECT string_agg(worker_id || '=' || n, ' ') FROM (SELECT worker_id, count(*) n FROM dspark.jobs GROUP BY 1 ORDER BY 1) x"))"
tap_is "$(q "SELECT count(DISTINCT output_ids) || '|' || count(DISTINCT worker_id) || '|' || count(DISTINCT spec_mode)
             FROM dspark.jobs WHERE custom_id LIKE 'same-%'")" "1|2|2" \
    "40 copies of a greedy prompt: one output, whichever worker ran them, with and without speculation"
[ "$(q "SELECT count(DISTINCT output_ids) || '|' || count(DISTINCT worker_id) FROM dspark.jobs
         WHERE custom_id LIKE 'same-%'")" = "1|2" ] ||
    tap_diag "$(q "SELECT spec_mode, worker_id, output_ids, count(*) FROM dspark.jobs WHERE custom_id LIKE 'same-%'
                   GROUP BY 1, 2, 3 ORDER BY 1, 2")"
tap_is "$(q "SELECT array_to_string(output_ids, ' ') FROM dspark.jobs WHERE custom_id = 'same-25'")" \
    "$("$DS_BUILDDIR/dspark-generate" --target "$E2E_TARGET" --prompt-ids "7 8 9 10 11" --max-tokens 24 --quiet --threads 1)" \
    "... and it is the target's own greedy output (dspark-generate without a draft)"

stop_dsparkd
tap_is "$DRC" "0" "SIGTERM: dsparkd and both workers stop cleanly"
tap_is "$(q "SELECT string_agg(state, ' ') FROM dspark.workers")" "stopped stopped" "both workers marked stopped"

# a small KV pool: each claimed job costs its prompt, its output, the draft's
# block (7 + 1 tokens) and the rounding to pages of 16 (at most 15), and the
# empty slots reserve nothing. 320 tokens, 40 slots (max_batch 32 and a
# quarter): a reserve for each empty slot (9 x 40 = 360) left no budget, and
# the idle worker took one job at a time; now a claim takes six jobs of
# 5 + 20 tokens (6 x 48 <= 320), as many as the pool holds (3 pages each)
q "DELETE FROM dspark.jobs" >/dev/null
write_conf "$T/small.conf" 0 "--kv-tokens 320"
start_dsparkd "$T/small.conf" "$T/small.log" 1
tap_result $? "a worker with a KV pool of 320 tokens starts"
q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature)
   SELECT '$E2E_MODEL', ARRAY[g, g + 1, g + 2, g + 3, g + 4], 20, 0 FROM generate_series(1, 12) g" >/dev/null
wait_sql "SELECT count(*) FROM dspark.jobs WHERE state = 'succeeded'" 12 60
tap_result $? "its 12 jobs succeed"
overlap=$(q "SELECT count(*) FROM dspark.jobs WHERE started_at < (SELECT min(finished_at) FROM dspark.jobs)")
tap_result $([ "$overlap" -ge 4 ]; echo $?) \
    "the claims fill the pool, not a reserve for empty slots: $overlap jobs started before the first finished"
largest=$(q "SELECT max(n) FROM (SELECT count(*) n FROM dspark.jobs GROUP BY started_at) c")
tap_is "$largest" "6" "... and no claim takes more than the pool holds (the largest took $largest jobs)"
stop_dsparkd
tap_done
