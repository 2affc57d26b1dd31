#!/bin/sh
# test-e2e-events.sh: submit -> events -> results, end to end through dsparkd,
# a real CPU dspark-worker and ZeroMQ subscribers: every state change of a
# watched job arrives as an event with increasing versions, a late subscriber
# learns the final state from the row, a subscriber of a delayed job follows it
# to the end, outputs and statistics land in PostgreSQL, dsparkctl waits and
# prints results, and a running job whose cancellation is requested stops
# within a round.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/e2e-lib.sh"
[ -x "$SUB" ] || tap_skip_all "tests/integration/test-daemon-sub not built"
e2e_start
EP="ipc://$T/events.sock"

# (an idle worker polls every 30 s: new jobs, and delayed jobs when they come
# due, wake it through notifications)
write_conf "$T/dspark.conf" 0 "--lease 10 --heartbeat 0.3 --log-level debug --poll-interval 30"
start_dsparkd "$T/dspark.conf" "$T/dsparkd.log" 1
tap_result $? "dsparkd starts a real dspark-worker, which becomes ready"
tap_is "$(q "SELECT concat_ws('|', worker_id, device, model, draft, state, model_checksum ~ '^[0-9a-f]{16}$',
                     draft_checksum ~ '^[0-9a-f]{16}$', jsonb_array_length(sps_profile->'tokens') > 0,
                     jsonb_typeof(sps_profile->'context'))
             FROM dspark.workers")" \
    "testhost/0|cpu:0|pair-target|draft-vanilla|running|t|t|t|null" \
    "the worker registered its identity, checksums and step-time profile (read from --sps: its context unknown)"

# a subscriber of every job, synced before the job exists
"$SUB" --endpoint "$EP" --topic 'job|' --timeout 120 >"$T/all.out" 2>&1 &
E2E_PIDS="$E2E_PIDS $!"
wait_for "$T/all.out" '^(synced|nosync)' 10
tap_like "$(head -n 1 "$T/all.out")" '^synced$' "the subscriber's subscription is acknowledged"

# (due one second later: dsparkd reads each notification's rows once, so a
# state that lasts less than that read may merge into the next)
jid=$(q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature, run_after)
         VALUES ('$E2E_MODEL', ARRAY[1, 2, 3, 4], 400, 0, now() + interval '1 s') RETURNING id")
wait_sql "SELECT state FROM dspark.jobs WHERE id = $jid" succeeded 30
tap_result $? "the watched job succeeds"
rowv=$(q "SELECT version FROM dspark.jobs WHERE id = $jid")
wait_for "$T/all.out" "^job id=$jid batch=- state=succeeded version=$rowv " 5
tap_result $? "its final event carries the row's final version ($rowv)"
grep "^job id=$jid " "$T/all.out" >"$T/job.events"
tap_is "$(sed 's/.*state=\([a-z]*\) .*/\1/' "$T/job.events" | tr '\n' ' ')" "queued running succeeded " \
    "the subscriber saw every state change of the job: queued, running, succeeded"
tap_is "$(sed 's/.*version=\([0-9]*\) .*/\1/' "$T/job.events" |
          awk 'NR > 1 && $1 <= prev { bad = 1 } { prev = $1 } END { print bad ? "no" : "yes" }')" "yes" \
    "versions increase from event to event"
tap_like "$(grep 'state=succeeded' "$T/job.events")" "attempt=1 finish=length tokens=400 tps=[0-9.]+ tau=[0-9.]+$" \
    "the final event carries the output tokens, tokens/s and tau"

tap_is "$(q "SELECT concat_ws('|', state, attempt, finish_reason, cardinality(output_ids), output_text IS NULL, error IS NULL)
             FROM dspark.jobs WHERE id = $jid")" "succeeded|1|length|400|t|t" \
    "the row holds the output ids (no text: this model has no tokenizer)"
tap_is "$(q "SELECT concat_ws('|', count(*), min(worker_id), min(device), min(model), min(draft), min(prompt_tokens),
                     min(output_tokens), min(rounds) > 0, min(num_draft_tokens) % 7 = 0 AND min(num_draft_tokens) <= 7 * min(rounds),
                     min(cardinality(acceptance_by_position)), min(cardinality(verified_by_position)),
                     bool_and(time_to_first_token_s > 0 AND e2e_latency_s >= time_to_first_token_s
                              AND decode_tokens_per_s > 0 AND queue_wait_s >= 0 AND mean_acceptance_length >= 1
                              AND mean_verify_len >= 0 AND model_checksum IS NOT NULL AND draft_checksum IS NOT NULL))
             FROM dspark.job_stats WHERE job_id = $jid")" \
    "1|testhost/0|cpu:0|pair-target|draft-vanilla|4|400|t|t|7|7|t" \
    "one statistics row: identity, tokens, rounds, drafted = 7 per drafting round, per-position arrays, times"
tap_is "$(q "SELECT (num_accepted_tokens = (SELECT sum(x) FROM unnest(acceptance_by_position) x))
                    AND abs(mean_acceptance_length - (num_accepted_tokens + rounds)::float8 / rounds) < 1e-9
             FROM dspark.job_stats WHERE job_id = $jid")" "t" \
    "tau = (accepted + rounds) / rounds, and accepted = the sum over positions"
tap_is "$(q "SELECT count(*) FROM dspark.job_stats s, generate_subscripts(s.verified_by_position, 1) k
             WHERE job_id = $jid AND (s.acceptance_by_position[k] > s.verified_by_position[k]
                                      OR (k > 1 AND s.verified_by_position[k] > s.acceptance_by_position[k - 1]))")" "0" \
    "verified_by_position counts the rounds that reached a position: accepted[k] <= verified[k] <= accepted[k - 1]"

# the late subscriber: subscribe, sync, read the row, final state from the row
late=$("$SUB" --endpoint "$EP" --topic "job|-|$jid|" --job "$jid" --dsn "$DSPARK_DSN" --timeout 5 2>&1 | tr '\n' ' ')
tap_is "$late" "synced row succeeded $rowv final succeeded $rowv row " "a late subscriber learns the final state from the row"

# a subscriber of a job that starts later follows it to its end through events
j2=$(q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature, run_after)
        VALUES ('$E2E_MODEL', ARRAY[5, 6, 7], 300, 0, now() + interval '2 s') RETURNING id")
"$SUB" --endpoint "$EP" --topic "job|-|$j2|" --job "$j2" --dsn "$DSPARK_DSN" --timeout 30 >"$T/follow.out" 2>&1
tap_like "$(cat "$T/follow.out" | tr '\n' ' ')" "^synced row queued 1 job id=$j2 .*state=running .*final succeeded [0-9]+ event $" \
    "a subscriber of a delayed job follows it through 'running' to its final state"
tap_ok "... started $(q "SELECT round(extract(epoch FROM started_at - run_after)::numeric, 2) FROM dspark.jobs WHERE id = $j2") s after it came due (dsparkd's pass wakes the idle worker)" \
    test "$(q "SELECT started_at - run_after < interval '5 s' FROM dspark.jobs WHERE id = $j2")" = t

# a batch through dsparkctl: JSONL with token-id prompts, wait, results
: >"$T/batch.jsonl"
for i in 1 2 3 4 5 6 7 8 9 10; do
    echo "{\"custom_id\": \"r$i\", \"method\": \"POST\", \"url\": \"/v1/completions\", \"body\": {\"model\": \"$E2E_MODEL\", \"prompt\": [$i, $((i + 1)), $((i + 2))], \"max_tokens\": $((10 + i)), \"temperature\": 0}}" >>"$T/batch.jsonl"
done
out=$("$DSPARKCTL" submit --file "$T/batch.jsonl" 2>&1)
tap_like "$out" "^batch [0-9]+: 10 jobs" "dsparkctl submits a JSONL batch"
bid=$(echo "$out" | sed -n 's/^batch \([0-9]*\):.*/\1/p')
timeout 60 "$DSPARKCTL" wait --batch "$bid" --timeout 50 >"$T/wait.out" 2>&1
tap_is "$?" "0" "dsparkctl wait returns 0 when every job of the batch succeeded"
"$DSPARKCTL" results --batch "$bid" >"$T/results.jsonl"
tap_is "$(wc -l <"$T/results.jsonl" | tr -d ' ')" "10" "dsparkctl results prints one line per job"
tap_py "results: status 200, custom ids r1..r10, finish_reason length, usage.completion_tokens = max_tokens" \
    "sorted((x['custom_id'], x['response']['status_code'], x['response']['body']['choices'][0]['finish_reason'], x['response']['body']['usage']['completion_tokens']) for x in d) == sorted(('r%d' % i, 200, 'length', 10 + i) for i in range(1, 11))" \
    "$T/results.jsonl"

# cancellation of running jobs: 12 long jobs share the rounds, cancel two
# while they run; they stop within a round or two of the heartbeat (no
# speculation: the random draft only slows these rounds down)
insert_jobs 12 480 none
wait_sql "SELECT count(*) >= 12 FROM dspark.jobs WHERE state = 'running' AND max_tokens = 480" t 20
c1=$(q "SELECT min(id) FROM dspark.jobs WHERE state = 'running' AND max_tokens = 480")
c2=$(q "SELECT max(id) FROM dspark.jobs WHERE state = 'running' AND max_tokens = 480")
out=$("$DSPARKCTL" cancel "$c1" "$c2" 2>&1)
tap_result $? "dsparkctl cancel of two running jobs"
wait_sql "SELECT count(*) FROM dspark.jobs WHERE id IN ($c1, $c2) AND state = 'cancelled'" 2 20
tap_result $? "both end 'cancelled'"
tap_is "$(q "SELECT bool_and(finish_reason = 'cancelled' AND cardinality(output_ids) < 480)
             FROM dspark.jobs WHERE id IN ($c1, $c2)")" "t" "... stopped early (fewer than max_tokens outputs), finish_reason cancelled"
wait_sql "SELECT count(*) FROM dspark.jobs WHERE max_tokens = 480 AND state IN ('queued', 'running')" 0 60
tap_is "$(q "SELECT string_agg(state || ':' || n, ' ' ORDER BY state) FROM (SELECT state, count(*) n FROM dspark.jobs
             WHERE max_tokens = 480 GROUP BY state) s")" "cancelled:2 succeeded:10" "the other jobs were not disturbed"
grep -q "job $c1: stopping attempt [0-9]*: cancellation requested" "$T/dsparkd.log"
tap_result $? "the worker logs the stop with the job id"

# every event the first subscriber saw for finished jobs is consistent with the rows
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE state NOT IN ('succeeded', 'cancelled')")" "0" "nothing failed"
grep -Eq "worker for device '0': [0-9]+ running, " "$T/dsparkd.log"
tap_result $? "the worker's STATUS lines reach dsparkd"
stop_dsparkd
tap_is "$DRC" "0" "SIGTERM: dsparkd and its worker stop cleanly"
tap_is "$(q "SELECT state FROM dspark.workers")" "stopped" "the worker marked itself stopped"

# text prompts, chat messages and stop strings on the bundled model with its
# tokenizer, run by a worker that logs in with only the dspark_worker role
TINY="$DS_SRCDIR/models/dspark-tiny-target"
q "CREATE ROLE e2e_worker LOGIN IN ROLE dspark_worker" >/dev/null
jt=$(q "INSERT INTO dspark.jobs (model, prompt, max_tokens, temperature, spec_mode)
        VALUES ('dspark-tiny-target', E'def add(a, b):\nx', 24, 0, 'none') RETURNING id")
js=$(q "INSERT INTO dspark.jobs (model, prompt, max_tokens, temperature, stop)
        VALUES ('dspark-tiny-target', 'def add(a, b):', 24, 0, ARRAY[':']) RETURNING id")
j1=$(q "INSERT INTO dspark.jobs (model, prompt, max_tokens, temperature)
        VALUES ('dspark-tiny-target', 'def add(a, b):', 1, 0) RETURNING id")
jc=$(q "INSERT INTO dspark.jobs (model, messages, max_tokens, temperature)
        VALUES ('dspark-tiny-target', '[{\"role\": \"user\", \"content\": \"Write a function that adds two numbers.\"}]', 16, 0)
        RETURNING id")
"$WORKER" --dsn "host=$PGHOST port=$PGPORT user=e2e_worker dbname=$PGDATABASE" --target "$TINY" --threads 1 \
    --worker-id tiny --once 2>"$T/tiny.log"
tap_is "$?" "0" "a worker with only the dspark_worker role runs the jobs and exits (--once)"
tap_is "$(q "SELECT output_text FROM dspark.jobs WHERE id = $jt")" \
    "$("$DS_BUILDDIR/dspark-generate" --target "$TINY" --prompt "$(printf 'def add(a, b):\nx')" --max-tokens 24 --quiet --threads 1)" \
    "a text prompt: the output text equals dspark-generate's"
tap_is "$(q "SELECT finish_reason || '|' || output_text FROM dspark.jobs WHERE id = $js")" \
    "stop|$("$DS_BUILDDIR/dspark-generate" --target "$TINY" --prompt 'def add(a, b):' --max-tokens 24 --stop ':' --quiet --threads 1)" \
    "a stop string ends the job with finish_reason 'stop', the text cut before it"
tap_is "$(q "SELECT s.output_tokens || '|' || coalesce(s.decode_tokens_per_s::text, 'null') || '|' || (s.time_to_first_token_s > 0)
             FROM dspark.job_stats s WHERE s.job_id = $j1")" "1|null|true" \
    "a one-token job has a time to its first token, and no decoding speed (NULL, not 0)"
# two stop strings that end in the same token (' ignore'): the text ends before the one that starts first, whatever
# their order (the first in the list once won: '  # pyrefly: ign')
g1=$("$DS_BUILDDIR/dspark-generate" --target "$TINY" --prompt 'def f(x):' --max-tokens 16 --stop ore --stop ign --quiet --threads 1)
g2=$("$DS_BUILDDIR/dspark-generate" --target "$TINY" --prompt 'def f(x):' --max-tokens 16 --stop ign --stop ore --quiet --threads 1)
tap_is "$g1|$g2" "  # pyrefly: |  # pyrefly: " "of two stop strings in one token's bytes, the one that starts first ends the text"
if [ -x "$DS_BUILDDIR/cli/dspark-tokenize" ]; then
    n=$(echo '[{"role": "user", "content": "Write a function that adds two numbers."}]' |
        "$DS_BUILDDIR/cli/dspark-tokenize" --tokenizer "$TINY" --chat | tr -cd ',' | wc -c)
    tap_is "$(q "SELECT s.prompt_tokens || '|' || j.state || '|' || (length(j.output_text) > 0) FROM dspark.jobs j
                 JOIN dspark.job_stats s ON s.job_id = j.id WHERE j.id = $jc")" "$((n + 1))|succeeded|true" \
        "chat messages are rendered with the chat template (prompt tokens as dspark-tokenize --chat counts them)"
else
    tap_skip "chat messages are rendered with the chat template" "cli/dspark-tokenize not built"
fi
tap_done
