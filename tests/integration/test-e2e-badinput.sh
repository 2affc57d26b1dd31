#!/bin/sh
# test-e2e-badinput.sh: bad input gets a clear error naming what is wrong, and
# the service keeps serving everything else. Refused at submission (dsparkctl)
# or INSERT (the schema's domains): negative or huge max_tokens, NaN
# temperature, invalid UTF-8, a malformed JSONL line. Failed by the worker,
# which goes on running: an unknown model (but not the model of a worker that
# is still starting), a prompt longer than the context,
# max_tokens beyond the context, token ids outside the vocabulary, text for a
# model without a tokenizer. Served, though the worker once refused them: a top_p
# below float's range, fixed:N above 32. And the worker's own configuration
# errors (exit 78), and a worker id that a live worker on another host holds
# (exit 1).
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/e2e-lib.sh"
e2e_start
C=$DSPARKCTL
export DSPARK_MODEL=$E2E_MODEL

write_conf "$T/dspark.conf" 0 "--unknown-model-timeout 1 --lease 10"
start_dsparkd "$T/dspark.conf" "$T/dsparkd.log" 1
tap_result $? "dsparkd and a worker are ready"
wpid=$(q "SELECT pid FROM dspark.workers")

# ---- refused at submission ----
out=$("$C" submit --max-tokens -5 hello 2>&1)
tap_is "$?" "2" "max_tokens -5: refused by dsparkctl (exit 2)"
tap_like "$out" "max-tokens must be an integer between 1 and 1000000, got '-5'" "... naming the option and the range"
out=$("$C" submit --max-tokens 2000000 hello 2>&1)
tap_like "$out" "max-tokens must be an integer between 1 and 1000000, got '2000000'" "max_tokens 2000000: refused, naming the range"
out=$("$C" submit --temperature nan hello 2>&1)
tap_like "$out" "temperature must be a finite number between 0 and 100, got nan" "temperature NaN: refused"
out=$(printf 'caf\351' | "$C" submit --prompt - 2>&1)
tap_like "$out" 'invalid byte sequence for encoding "UTF8": 0xe9' "invalid UTF-8 in a prompt: refused, naming the byte"
out=$(q "INSERT INTO dspark.jobs (model, prompt, max_tokens) VALUES ('m', 'x', -1)" 2>&1)
tap_like "$out" 'domain dspark.max_tokens violates check constraint "max_tokens_between_1_and_1000000"' \
    "plain SQL: max_tokens -1 refused at INSERT, naming the rule"
out=$(q "INSERT INTO dspark.jobs (model, prompt, temperature) VALUES ('m', 'x', 'NaN')" 2>&1)
tap_like "$out" 'domain dspark.temperature violates check constraint "temperature_finite_between_0_and_100"' \
    "plain SQL: temperature NaN refused at INSERT, naming the rule"

# a JSONL file with a malformed line 3 and invalid UTF-8 on line 5
{
    echo "{\"custom_id\": \"ok-1\", \"method\": \"POST\", \"url\": \"/v1/completions\", \"body\": {\"prompt\": [1, 2, 3], \"max_tokens\": 6}}"
    echo "{\"custom_id\": \"ok-2\", \"method\": \"POST\", \"url\": \"/v1/completions\", \"body\": {\"prompt\": [4, 5], \"max_tokens\": 6}}"
    echo "{\"custom_id\": \"broken\", \"method\": \"POST\", \"body\": {\"prompt\": [1,"
    echo "{\"custom_id\": \"ok-3\", \"method\": \"POST\", \"url\": \"/v1/completions\", \"body\": {\"prompt\": [6], \"max_tokens\": 6}}"
    printf '{"custom_id": "utf8", "method": "POST", "url": "/v1/completions", "body": {"prompt": "caf\351"}}\n'
} >"$T/bad.jsonl"
out=$("$C" submit --file "$T/bad.jsonl" 2>&1)
tap_is "$?" "1" "a JSONL file with bad lines: refused as a whole (exit 1)"
tap_like "$out" "bad.jsonl: line 3: invalid JSON" "... naming line 3 (malformed JSON)"
tap_like "$out" "bad.jsonl: line 5: invalid JSON: unable to decode byte 0xe9" "... and line 5 (invalid UTF-8)"
tap_is "$(q "SELECT count(*) FROM dspark.jobs")" "0" "... and nothing was queued"
out=$("$C" submit --file "$T/bad.jsonl" --skip-invalid 2>&1)
tap_like "$out" "batch [0-9]+: 3 jobs .*2 invalid lines skipped" "--skip-invalid queues the 3 good lines"
bid=$(echo "$out" | sed -n 's/^batch \([0-9]*\):.*/\1/p')

# ---- failed by the worker, which keeps going ----
mk() { q "INSERT INTO dspark.jobs (model, custom_id, $1) VALUES ('${3:-$E2E_MODEL}', '$2', $4) RETURNING id"; }
# Start a worker serving under worker id $1 (log $T/$1.log) with short heartbeats; its pid in $served_pid.
serve_as() {
    "$WORKER" --target "$E2E_TARGET" --sps "$T/sps.json" --threads 1 --worker-id "$1" --lease 10 \
        --heartbeat 0.2 >"$T/$1.log" 2>&1 &
    served_pid=$!
    E2E_PIDS="$E2E_PIDS $served_pid"
    wait_for "$T/$1.log" "ready: serving" 60
}
# Wait up to 10 s for job $1 to reach state $2.
wait_state() {
    _n=0
    while [ "$(q "SELECT state FROM dspark.jobs WHERE id = $1")" != "$2" ] && [ $_n -lt 100 ]; do
        sleep 0.1
        _n=$((_n + 1))
    done
}
# Wait up to 30 s (a loaded host is slow) for process $1 to exit and reap it: its exit status is this
# one's (143 when it was still running then and got SIGTERM).
reap() {
    _n=0
    while kill -0 "$1" 2>/dev/null && [ $_n -lt 300 ]; do
        sleep 0.1
        _n=$((_n + 1))
    done
    kill -0 "$1" 2>/dev/null && kill -TERM "$1"
    wait "$1"
}
j_long=$(mk "prompt_ids, max_tokens" long-prompt "" "(SELECT array_agg(g % 500) FROM generate_series(1, 600) g), 8")
j_ctx=$(mk "prompt_ids, max_tokens" huge-max-tokens "" "ARRAY[1, 2, 3], 100000")
j_vocab=$(mk "prompt_ids, max_tokens" bad-ids "" "ARRAY[1, 700, 3], 8")
j_text=$(mk "prompt, max_tokens" text-prompt "" "'def f():', 8")
j_stop=$(mk "prompt_ids, max_tokens, stop" stop-string "" "ARRAY[1, 2], 8, ARRAY['x']")
j_model=$(mk "prompt_ids, max_tokens" unknown-model no-such-model "ARRAY[1, 2], 8")
# what the table takes and the worker once refused: a top_p below float's range, fixed:N above 32
j_top_p=$(mk "prompt_ids, max_tokens, temperature, top_p, spec_mode" tiny-top-p "" "ARRAY[1, 2], 8, 1, 1e-50, 'fixed:64'")
insert_jobs 30 12
timeout 60 "$C" wait --batch "$bid" --timeout 50 >/dev/null 2>&1
tap_is "$?" "0" "the 3 good lines of the file all succeed"
wait_sql "SELECT count(*) FROM dspark.jobs WHERE state IN ('queued', 'running')" 0 30
tap_result $? "every job reaches a final state"

err() { q "SELECT state || ': ' || coalesce(error, '') FROM dspark.jobs WHERE id = $1"; }
tap_is "$(err "$j_long")" "failed: prompt of 600 tokens plus max_tokens 8 exceeds the context of 512 tokens" \
    "a prompt longer than the context fails with the reason"
tap_is "$(err "$j_ctx")" "failed: prompt of 3 tokens plus max_tokens 100000 exceeds the context of 512 tokens" \
    "max_tokens beyond the context fails with the reason"
tap_is "$(err "$j_vocab")" "failed: prompt token 1 (id 700) is outside the vocabulary of 512" \
    "a token id outside the vocabulary fails, naming the position and id"
tap_is "$(err "$j_text")" "failed: model 'pair-target' has no tokenizer: submit the prompt as token ids (prompt_ids)" \
    "a text prompt for a model without a tokenizer fails with the reason"
tap_like "$(err "$j_stop")" "^failed: stop strings need the model's tokenizer" "a stop string without a tokenizer fails with the reason"
tap_is "$(err "$j_model")" "failed: no worker serves model 'no-such-model' (models served now: 'pair-target')" \
    "a job for a model no worker serves fails after --unknown-model-timeout, naming the model"
tap_is "$(err "$j_top_p")" "succeeded: " "top_p 1e-50 with fixed:64, both within the table's rules, succeeds"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE state = 'failed' AND (finish_reason <> 'error' OR error IS NULL)")" "0" \
    "failed jobs have finish_reason 'error' and an error message"
tap_is "$(q "SELECT string_agg(state || ':' || n, ' ') FROM (SELECT state, count(*) n FROM dspark.jobs
             WHERE custom_id IS NULL OR custom_id LIKE 'ok-%' GROUP BY state) s")" "succeeded:33" \
    "every good job around them succeeded"
tap_is "$(q "SELECT pid FROM dspark.workers")" "$wpid" "the worker never crashed or restarted"
kill -0 "$DPID" 2>/dev/null
tap_result $? "dsparkd still runs"
out=$(printf 'print(1)\n' | "$C" submit --prompt - --model "$E2E_MODEL" 2>&1)
tap_like "$out" "^[0-9]+$" "and still accepts jobs"

# ---- a worker that is still starting keeps its model served ----
# It measures its step-time profile (no --sps: seconds at --max-batch 256 on
# one thread) after it announced itself; SIGSTOP holds it there.
"$WORKER" --target "$E2E_TARGET" --draft "$E2E_DRAFT" --model-name slow-model --backend cpu --threads 1 \
    --max-batch 256 --unknown-model-timeout 1 --lease 10 >"$T/slow.log" 2>&1 &
slow_pid=$!
E2E_PIDS="$E2E_PIDS $slow_pid"
wait_sql "SELECT state FROM dspark.workers WHERE model = 'slow-model'" starting 20
tap_result $? "a worker announces itself as 'starting' before it is ready"
kill -STOP "$slow_pid"
j_slow=$(q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, created_at) VALUES ('slow-model', ARRAY[1, 2], 4, now() - interval '1 hour') RETURNING id")
sleep 11
tap_is "$(err "$j_slow")" "queued: " "the other worker's unknown-model sweep leaves the old jobs of a starting worker's model queued"
kill -CONT "$slow_pid"
wait_sql "SELECT heartbeat_at > started_at + interval '10 s' FROM dspark.workers WHERE model = 'slow-model'" t 10
tap_result $? "a starting worker renews its heartbeat"
wait_sql "SELECT state FROM dspark.jobs WHERE id = $j_slow" succeeded 60
tap_result $? "once ready, the worker runs those jobs"
tap_is "$(q "SELECT state || '|' || (sps_profile->>'context') FROM dspark.workers WHERE model = 'slow-model'")" "running|128" \
    "... registered as running, with the context its profile was measured at"
kill -TERM "$slow_pid"
wait "$slow_pid"

# ---- a worker that starts before its database announces itself once it can ----
# (database 'later' does not exist yet; the profile at --max-batch 512 takes
# about ten seconds on one thread, while the worker retries every 2 s)
"$WORKER" --dsn "dbname=later" --target "$E2E_TARGET" --draft "$E2E_DRAFT" --model-name later-model \
    --backend cpu --threads 1 --max-batch 512 --lease 10 >"$T/later.log" 2>&1 &
later_pid=$!
E2E_PIDS="$E2E_PIDS $later_pid"
sleep 1
q "CREATE DATABASE later" >/dev/null
"$C" -d "dbname=later" db init >/dev/null 2>&1
n=0
while [ "$(psql -X -q -A -t -d later -c "SELECT state FROM dspark.workers" 2>/dev/null)" != starting ] && [ $n -lt 40 ]; do
    sleep 0.2
    n=$((n + 1))
done
tap_is "$(psql -X -q -A -t -d later -c "SELECT state || ' ' || model FROM dspark.workers")" "starting later-model" \
    "a worker whose database appears while it loads announces itself as starting"
n=0
while [ "$(psql -X -q -A -t -d later -c "SELECT state FROM dspark.workers" 2>/dev/null)" != running ] && [ $n -lt 150 ]; do
    sleep 0.2
    n=$((n + 1))
done
tap_is "$(psql -X -q -A -t -d later -c "SELECT state FROM dspark.workers")" "running" "... and registers on that connection once loaded"
kill -TERM "$later_pid"
wait "$later_pid"

stop_dsparkd
tap_is "$DRC" "0" "SIGTERM: everything stops cleanly"

# ---- a worker id held by a live worker on another host ----
q "INSERT INTO dspark.workers (worker_id, host, pid, device, model, state, heartbeat_at)
   VALUES ('shared-id', 'otherhost', 4242, 'cuda:0', '$E2E_MODEL', 'running', now())" >/dev/null
out=$(timeout 20 "$WORKER" --target "$E2E_TARGET" --sps "$T/sps.json" --threads 1 --worker-id shared-id --once 2>&1)
tap_is "$?" "1" "a worker whose id another host's live worker holds does not start (exit 1: its supervisor retries)"
tap_like "$out" "worker id 'shared-id' is in use on host 'otherhost' \\(pid 4242, running, heartbeat [0-9.]+ s ago\\)" \
    "... naming the host that holds it"
tap_is "$(q "SELECT host || '|' || pid || '|' || state FROM dspark.workers WHERE worker_id = 'shared-id'")" \
    "otherhost|4242|running" "... and leaves that worker's row alone"
q "UPDATE dspark.workers SET heartbeat_at = now() - interval '1 hour' WHERE worker_id = 'shared-id'" >/dev/null
timeout 30 "$WORKER" --target "$E2E_TARGET" --sps "$T/sps.json" --threads 1 --worker-id shared-id --once \
    >"$T/shared.log" 2>&1
tap_is "$?|$(q "SELECT host <> 'otherhost' FROM dspark.workers WHERE worker_id = 'shared-id'")" "0|t" \
    "once that worker's heartbeat is older than a lease, the id is taken over"

# ---- a running worker whose id is taken over stops ----
# (as when it was cut off from the database for longer than a lease and a
# worker on another host started under its id: worker_starting's live_s 0)
serve_as moved-id
moved_pid=$served_pid
mjob=$(mk "prompt_ids, max_tokens" moved-job "" "ARRAY[1, 2, 3], 4")
wait_state "$mjob" succeeded
tap_is "$(q "SELECT state || ' ' || worker_id FROM dspark.jobs WHERE id = $mjob")" "succeeded moved-id" \
    "a worker serves under its id"
q "SELECT dspark.worker_starting('moved-id', 'otherhost', 4343, 'cuda:0', '$E2E_MODEL', 0)" >/dev/null
reap "$moved_pid"
tap_is "$?" "1" "when another host takes its id over, the worker learns it from its next claim or heartbeat and exits 1"
tap_like "$(cat "$T/moved-id.log")" \
    "worker id 'moved-id' was taken over by host 'otherhost' \\(pid 4343\\) while this worker's heartbeat was older than a lease" \
    "... naming the new holder"
tap_is "$(q "SELECT host || '|' || pid || '|' || state FROM dspark.workers WHERE worker_id = 'moved-id'")" \
    "otherhost|4343|starting" "... and leaves the new holder's row as it was (not stopped, not heartbeated)"

# ---- the same, by a process with the worker's own host and pid (containers) ----
serve_as twin-id
twin_pid=$served_pid
tap_like "$(q "SELECT length(instance) || '|' || pid FROM dspark.workers WHERE worker_id = 'twin-id'")" "^32\\|$twin_pid\$" \
    "a worker registers with a random instance token of its own"
q "SELECT dspark.worker_starting('twin-id', '$(uname -n)', $twin_pid, 'cuda:0', '$E2E_MODEL', 0, 'another-process')" >/dev/null
reap "$twin_pid"
tap_is "$?" "1" "a process with the worker's host and pid but another instance takes its id over: the worker exits 1"
tap_like "$(cat "$T/twin-id.log")" "taken over by host '$(uname -n)' \\(pid $twin_pid, instance 'another-process'\\)" \
    "... naming the other instance"

# ---- a worker whose id is taken over: its unknown-model sweep claims nothing (020) ----
# Claims and heartbeats 30 s apart and the sweep every second, so that after the takeover the sweep is
# the first to reach the database. The job's model counts as served (a live worker row) until then.
q "INSERT INTO dspark.workers (worker_id, host, pid, device, model, state, heartbeat_at)
   VALUES ('serves-gone', 'otherhost', 4545, 'cuda:0', 'gone-model', 'running', now())" >/dev/null
"$WORKER" --target "$E2E_TARGET" --sps "$T/sps.json" --threads 1 --worker-id swept-id --lease 90 --heartbeat 30 \
    --poll-interval 30 --unknown-model-timeout 1 >"$T/swept-id.log" 2>&1 &
swept_pid=$!
E2E_PIDS="$E2E_PIDS $swept_pid"
wait_for "$T/swept-id.log" "ready: serving" 60
gjob=$(mk "prompt_ids, max_tokens" gone-job gone-model "ARRAY[1, 2], 8")
q "UPDATE dspark.jobs SET created_at = now() - interval '1 hour' WHERE id = $gjob" >/dev/null
sleep 1   # the claim that the new job's notification wakes (it finds nothing of its model) comes first
q "SELECT dspark.worker_starting('swept-id', 'otherhost', 4646, 'cuda:0', '$E2E_MODEL', 0)" >/dev/null
q "UPDATE dspark.workers SET state = 'stopped', heartbeat_at = now() - interval '1 hour'
   WHERE worker_id = 'serves-gone'" >/dev/null
reap "$swept_pid"
tap_is "$?|$(q "SELECT state FROM dspark.jobs WHERE id = $gjob")" "1|queued" \
    "a worker whose id was taken over is refused at its unknown-model sweep and exits 1, the job of the model nobody serves left queued"
tap_like "$(cat "$T/swept-id.log")" "worker id 'swept-id' was taken over by host 'otherhost' \\(pid 4646\\)" \
    "... naming the new holder"
q "DELETE FROM dspark.jobs WHERE id = $gjob; DELETE FROM dspark.workers WHERE worker_id = 'serves-gone'" >/dev/null

# ---- a running worker whose row is gone (pruned while it was cut off) registers again ----
serve_as pruned-id
pruned_pid=$served_pid
q "DELETE FROM dspark.workers WHERE worker_id = 'pruned-id'" >/dev/null
n=0
while [ "$(q "SELECT count(*) FROM dspark.workers WHERE worker_id = 'pruned-id'")" != 1 ] && [ $n -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
tap_is "$(q "SELECT state || '|' || pid || '|' || (model_checksum IS NOT NULL) FROM dspark.workers WHERE worker_id = 'pruned-id'")" \
    "running|$pruned_pid|true" "a worker whose row is deleted while it runs registers again from its next heartbeat"
tap_like "$(cat "$T/pruned-id.log")" "worker id 'pruned-id' has no row in dspark.workers.*registering again" "... saying so"
pjob=$(mk "prompt_ids, max_tokens" pruned-job "" "ARRAY[1, 2, 3], 4")
wait_state "$pjob" succeeded
tap_is "$(q "SELECT state || ' ' || worker_id FROM dspark.jobs WHERE id = $pjob")" "succeeded pruned-id" "... and serves on"
kill -TERM "$pruned_pid"
wait "$pruned_pid"
tap_is "$?" "0" "... and stops cleanly"

# ---- the worker's configuration errors: exit 78 with a message ----
out=$("$WORKER" --target "$E2E_TARGET" --backend cuda 2>&1)
tap_is "$?" "78" "--backend cuda where it cannot run (a build without CUDA, or no device): exit 78"
tap_like "$out" "backend 'cuda'" "... saying so"
out=$("$WORKER" --target "$T/no-such-dir" 2>&1)
tap_is "$?" "78" "a missing model directory: exit 78"
tap_like "$out" "could not load the target model: .*no-such-dir" "... naming it"
out=$("$WORKER" --target "$E2E_TARGET" --max-batch 0 2>&1)
tap_is "$?" "78" "a bad option value: exit 78"
tap_like "$out" "option --max-batch: expected an integer between 1 and 65536, got '0'" "... naming the option"
q "INSERT INTO dspark.schema_version (version, name) VALUES (99, '099-future')" >/dev/null
out=$(timeout 20 "$WORKER" --target "$E2E_TARGET" --once 2>&1)
tap_is "$?" "78" "a database schema this build does not know: exit 78"
tap_like "$out" "database schema version 99, this build knows [0-9]+: run 'dsparkctl db migrate'" "... with the migration hint"
tap_done
