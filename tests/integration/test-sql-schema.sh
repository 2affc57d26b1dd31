#!/bin/sh
# test-sql-schema.sh: migrations (init, idempotent migrate, concurrent
# migrate, files vs embedded), the schema-version refusal, and bad input
# refused at INSERT with messages that name the problem (SQL and dsparkctl).
. "${DS_SRCDIR:-$(dirname "$0")/../..}/tests/integration/pg-harness.sh"
pg_harness_start
T=$PGH_DIR

# --- migrations ---------------------------------------------------------
out=$("$DSPARKCTL" status 2>&1)
tap_is "$?" 1 "a command refuses a database without the schema"
tap_like "$out" "database has no dspark schema: run 'dsparkctl db init'" "... and says what to run"

out=$("$DSPARKCTL" db init 2>&1)
tap_is "$?" 0 "db init succeeds"
tap_like "$out" "created schema version 22" "db init reports the version"
tap_is "$(q 'SELECT string_agg(version || name, $$ $$ ORDER BY version) FROM dspark.schema_version')" \
    "1001-schema 2002-queue 3003-throughput 4004-index-churn 5005-notify-chunks 6006-job-stats-time 7007-attempts 8008-worker-ids 9009-worker-fence 10010-worker-instance 11011-claim-job-tokens 12012-expiry 13013-resubmit 14014-client-turns 15015-delayed-jobs 16016-client-shares 17017-heartbeat-strays 18018-heartbeat-watermark 19019-heartbeat-stray-warning 20020-claim-unserved-held 21021-unserved-waited 22022-join-batches-guard" "schema_version holds every migration once"

out=$("$DSPARKCTL" db init 2>&1)
tap_is "$?" 1 "db init refuses an initialised database"
tap_like "$out" "already has a dspark schema \\(version 22\\)" "... with a clear message"

out=$("$DSPARKCTL" db migrate 2>&1)
tap_is "$?" 0 "db migrate on a current database succeeds"
tap_like "$out" "schema version 22 is current" "... and changes nothing"
tap_is "$(q 'SELECT count(*) FROM dspark.schema_version')" 22 "... no duplicate version rows"

"$DSPARKCTL" db status >/dev/null 2>&1
tap_is "$?" 0 "db status exits 0 on a current schema"

# dsparkd's status reads the last minute of job_stats through its BRIN index (006), not the whole table
plan=$(psql -X -A -t -d dspark -c "SET enable_seqscan = off" -c "EXPLAIN SELECT coalesce(sum(output_tokens), 0)
    FROM dspark.job_stats WHERE created_at > now() - interval '60 seconds'" 2>&1)
tap_like "$plan" "Bitmap Index Scan on job_stats_created_at_brin" "the status query's job_stats rows come from the created_at index"

# the same schema from the files as from the embedded copy
q 'CREATE DATABASE fromfiles' >/dev/null
"$DSPARKCTL" -d "host=$T port=5432 user=postgres dbname=fromfiles" db migrate \
    --sql-dir "$DS_SRCDIR/sql" >/dev/null 2>&1
tap_is "$?" 0 "db migrate --sql-dir applies the sql/ files"
# (newer pg_dump brackets its output with \restrict KEY lines, KEY random)
pg_dump -s -d dspark -n dspark 2>/dev/null | grep -v '^\\.*restrict ' >"$T/embedded.sql"
pg_dump -s -d fromfiles -n dspark 2>/dev/null | grep -v '^\\.*restrict ' >"$T/files.sql"
if cmp -s "$T/embedded.sql" "$T/files.sql" && [ -s "$T/files.sql" ]; then r=0; else r=1; fi
tap_result $r "the embedded migrations build the same schema as sql/*.sql"

# an upgrade from schema 14 marks the jobs queued for later (015)
q 'CREATE DATABASE from14' >/dev/null
r=0
for f in $(ls "$DS_SRCDIR"/sql/0*.sql | head -n 14); do
    psql -X -q -1 -v ON_ERROR_STOP=1 -d from14 -f "$f" >/dev/null 2>&1 || r=1
done
psql -X -q -d from14 -c "INSERT INTO dspark.jobs (model, prompt, run_after)
    VALUES ('m', 'now', now()), ('m', 'later', now() + interval '1 hour')" >/dev/null 2>&1 || r=1
"$DSPARKCTL" -d "host=$T port=5432 user=postgres dbname=from14" db migrate >/dev/null 2>&1 || r=1
tap_is "$r|$(psql -X -A -t -d from14 -c "SELECT string_agg(prompt || ':' || delayed, ',' ORDER BY id) FROM dspark.jobs")|$(psql -X -A -t -d from14 -c "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w', 5, NULL, 60)")" \
    "0|now:false,later:true|now" "a schema 14 database migrates to 22 with its jobs for later marked delayed, and claims take the others"

# two migrations at once apply each version once
q 'CREATE DATABASE racing' >/dev/null
tap_is "$(race_migrate "host=$T port=5432 user=postgres dbname=racing")" 00 "two concurrent db migrate both succeed"
tap_is "$(psql -X -A -t -d racing -c 'SELECT count(*) FROM dspark.schema_version')" 22 \
    "... and applied each migration once"
# the same where transactions default to repeatable read (each migration's runs read committed)
q 'CREATE DATABASE racing_rr' >/dev/null
q "ALTER DATABASE racing_rr SET default_transaction_isolation = 'repeatable read'" >/dev/null
tap_is "$(race_migrate "host=$T port=5432 user=postgres dbname=racing_rr")|$(psql -X -A -t -d racing_rr -c 'SELECT count(*) FROM dspark.schema_version')" "00|22" \
    "two concurrent db migrate on a database whose default isolation is repeatable read: both succeed, each migration once"

# a database newer than the build is refused by everything but db status
q "INSERT INTO dspark.schema_version (version, name) VALUES (99, '099-future')"
out=$("$DSPARKCTL" list 2>&1)
tap_is "$?" 1 "an unknown schema version is refused"
tap_like "$out" "database schema version 99, this build knows 22: run 'dsparkctl db migrate'" \
    "... with the version message"
out=$("$DSPARKCTL" db migrate 2>&1)
tap_is "$?" 1 "db migrate refuses a database newer than the build"
tap_like "$out" "newer than this build knows" "... and says so"
"$DSPARKCTL" db status >/dev/null 2>&1
tap_is "$?" 1 "db status exits 1 when the versions differ"
q "DELETE FROM dspark.schema_version WHERE version = 99"

# --- bad input refused at INSERT -------------------------------------------
# bad COLUMNS VALUES PATTERN DESCRIPTION
bad() {
    _out=$(psql -X -q -v ON_ERROR_STOP=1 -c "INSERT INTO dspark.jobs ($1) VALUES ($2)" 2>&1)
    if [ $? -ne 0 ] && printf '%s' "$_out" | grep -Eq -- "$3"; then
        tap_result 0 "$4"
    else
        tap_result 1 "$4"
        printf '%s\n' "$_out" | head -n 3 | sed 's/^/#   got: /'
    fi
}
bad "model, prompt, max_tokens" "'m', 'x', -5" 'domain dspark.max_tokens violates check constraint "max_tokens_between_1_and_1000000"' \
    "negative max_tokens refused, naming max_tokens"
bad "model, prompt, max_tokens" "'m', 'x', 1000001" 'max_tokens_between_1_and_1000000' "huge max_tokens refused"
bad "model, prompt, max_tokens" "'m', 'x', 0" 'max_tokens_between_1_and_1000000' "max_tokens 0 refused"
bad "model, prompt, temperature" "'m', 'x', 'NaN'" 'domain dspark.temperature violates check constraint "temperature_finite_between_0_and_100"' \
    "NaN temperature refused, naming temperature"
bad "model, prompt, temperature" "'m', 'x', 'Infinity'" 'temperature_finite_between_0_and_100' "infinite temperature refused"
bad "model, prompt, temperature" "'m', 'x', -0.5" 'temperature_finite' "negative temperature refused"
bad "model, prompt, top_p" "'m', 'x', 0" 'top_p_above_0_at_most_1' "top_p 0 refused"
bad "model, prompt, top_p" "'m', 'x', 'NaN'" 'top_p_above_0_at_most_1' "NaN top_p refused"
bad "model, prompt, top_k" "'m', 'x', -1" 'top_k_at_least_0' "negative top_k refused"
bad "model, prompt, priority" "'m', 'x', 5000" 'priority_between_minus_1000_and_1000' "priority out of range refused"
bad "model, prompt, max_attempts" "'m', 'x', 0" 'max_attempts_between_1_and_100' "max_attempts 0 refused"
bad "model, prompt, spec_mode" "'m', 'x', 'fixed:0'" 'spec_mode_dspark_dspark_async_fixed_n_threshold_x_or_none' "spec_mode fixed:0 refused"
bad "model, prompt, spec_mode" "'m', 'x', 'turbo'" 'spec_mode_' "unknown spec_mode refused"
bad "model, prompt, stop" "'m', 'x', '{\"\"}'" 'stop_at_most_16_strings_of_1_to_256_bytes' "empty stop string refused"
bad "model" "'m'" 'exactly_one_of_prompt_messages_prompt_ids' "a job without a prompt refused"
bad "model, prompt, prompt_ids" "'m', 'x', '{1}'" 'exactly_one_of_prompt_messages_prompt_ids' "two prompts refused"
bad "model, messages" "'m', '[{\"role\": \"user\"}]'" 'messages_array_of_role_content_objects' "a message without content refused"
bad "model, messages" "'m', '{\"role\": \"user\", \"content\": \"x\"}'" 'messages_array_of_role_content_objects' "messages that are not an array refused"
bad "model, prompt_ids" "'m', '{5,-1}'" 'prompt_ids_1_to_1000000_non_negative' "negative token ids refused"
bad "model, prompt" "'', 'x'" 'model_name_1_to_256_bytes' "empty model name refused"
bad "model, prompt" "'m', convert_from('\\xff41'::bytea, 'UTF8')" 'invalid byte sequence for encoding "UTF8"' \
    "invalid UTF-8 in a prompt refused"
printf "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'bad \377 byte');\n" >"$T/badutf8.sql"
out=$(psql -X -q -v ON_ERROR_STOP=1 -f "$T/badutf8.sql" 2>&1)
tap_like "$out" 'invalid byte sequence for encoding "UTF8": 0xff' "raw invalid UTF-8 from a client refused by the server"
tap_is "$(q 'SELECT count(*) FROM dspark.jobs')" 0 "none of the bad rows was inserted"

id=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'fine') RETURNING id")
tap_is "$(q "SELECT state || ' ' || attempt || ' ' || max_tokens || ' ' || temperature || ' ' || spec_mode || ' ' || version || ' ' || owner FROM dspark.jobs WHERE id = $id")" \
    "queued 0 1024 1 dspark 1 postgres" "a good row takes the documented defaults"
for mode in dspark dspark-async none fixed:1 fixed:64 threshold:0 threshold:0.35 threshold:1; do
    q "INSERT INTO dspark.jobs (model, prompt, spec_mode) VALUES ('m', 'x', '$mode')" >/dev/null 2>&1 || break
done
tap_is "$mode" "threshold:1" "every documented spec_mode is accepted"
q "DELETE FROM dspark.jobs" >/dev/null

# --- dsparkctl submit refuses a bad JSONL line, atomically -----------------
good='{"custom_id":"ID","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}}'
{
    echo "$good" | sed 's/ID/r1/'
    echo "$good" | sed 's/ID/r2/'
    echo "$good" | sed 's/ID/r3/; s/"max_tokens":8/"max_tokens":-3/'
    echo "$good" | sed 's/ID/r4/'
} >"$T/bad3.jsonl"
out=$("$DSPARKCTL" submit -f "$T/bad3.jsonl" 2>&1)
tap_is "$?" 1 "submit of a file with a bad line fails"
tap_like "$out" "line 3: body.max_tokens: must be an integer between 1 and 1000000, got -3" \
    "... reporting the line number and the problem"
tap_is "$(q 'SELECT count(*) FROM dspark.jobs') $(q 'SELECT count(*) FROM dspark.batches')" "0 0" \
    "... and nothing of the file was inserted"

{
    echo "$good" | sed 's/ID/a/'
    echo '{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": '
    echo "$good" | sed 's/ID/c/; s/"max_tokens":8/"max_tokens":8,"temperature":250/'
    echo "$good" | sed 's/ID/a/'
    echo "$good" | sed 's/ID/d/; s|/v1/chat/completions|/v1/embeddings|'
    printf '{"turns": ["bad \377"]}\n'
    echo '{"turns": []}'
    echo "$good" | sed 's/ID/e/'
} >"$T/many.jsonl"
out=$("$DSPARKCTL" submit -f "$T/many.jsonl" 2>&1)
tap_is "$?" 1 "submit of a file with several bad lines fails"
tap_like "$out" "line 2: invalid JSON" "... line 2: truncated JSON"
tap_like "$out" "line 3: body.temperature" "... line 3: temperature out of range"
tap_like "$out" "line 4: custom_id 'a' is already used on line 1" "... line 4: duplicate custom_id"
tap_like "$out" "line 5: url: must be" "... line 5: unsupported url"
tap_like "$out" "line 6: invalid JSON: unable to decode byte 0xff" "... line 6: invalid UTF-8"
tap_like "$out" "line 7: turns: must be a non-empty array" "... line 7: empty turns"
tap_like "$out" "6 invalid lines: nothing was submitted" "... and a summary"
out=$("$DSPARKCTL" submit -f "$T/many.jsonl" --skip-invalid --json 2>/dev/null)
tap_is "$?" 0 "--skip-invalid submits the valid lines"
tap_is "$(q 'SELECT string_agg(custom_id, $$,$$ ORDER BY id) FROM dspark.jobs')" "a,e" \
    "... exactly the valid ones, in file order"

# --- batches: the reference and custom_id unique within a batch -------------
# (checked by triggers: the jobs of a batch are found through a BRIN index)
q "DELETE FROM dspark.jobs; DELETE FROM dspark.batches" >/dev/null
b1=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
b2=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
bad "batch_id, custom_id, model, prompt" "$((b2 + 100)), 'x', 'm', 'p'" \
    "batch $((b2 + 100)) does not exist \\(or is not yours\\)" "a job naming a batch that does not exist is refused"
bad "batch_id, custom_id, model, prompt" "$b1, 'x', 'm', 'p'), ($b1, 'y', 'm', 'p'), ($b1, 'x', 'm', 'p'" \
    "duplicate key value violates unique constraint \"jobs_batch_custom_id_key\"" \
    "a custom_id repeated within one INSERT into a batch is refused"
q "INSERT INTO dspark.jobs (batch_id, custom_id, model, prompt) VALUES ($b1, 'x', 'm', 'p'), ($b1, 'y', 'm', 'p'), ($b1, NULL, 'm', 'p'), ($b1, NULL, 'm', 'p'), ($b2, 'x', 'm', 'p')" >/dev/null
tap_is "$?" 0 "the same custom_id in two batches, and several jobs without one, are accepted"
out=$(q "INSERT INTO dspark.jobs (batch_id, custom_id, model, prompt) VALUES ($b1, 'y', 'm', 'p')" 2>&1)
tap_like "$out" "Key \(batch_id, custom_id\)=\($b1, y\) already exists" \
    "a later INSERT repeating a custom_id of the batch is refused, naming the key"
out=$(q "UPDATE dspark.jobs SET batch_id = $b1 WHERE batch_id = $b2" 2>&1)
tap_like "$out" "jobs_batch_custom_id_key" "moving a job into a batch that has its custom_id is refused"
out=$(q "UPDATE dspark.jobs SET custom_id = 'y' WHERE batch_id = $b1 AND custom_id = 'x'" 2>&1)
tap_like "$out" "jobs_batch_custom_id_key" "renaming a custom_id to one the batch has is refused"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE batch_id = $b1 AND custom_id IS NOT NULL")" 2 \
    "... and the batch still has its two named jobs"
# two sessions adding the same custom_id to one batch: the second waits for the
# first (the batch row is locked) and is then refused
psql -X -q -v ON_ERROR_STOP=1 -c "BEGIN" \
    -c "INSERT INTO dspark.jobs (batch_id, custom_id, model, prompt) VALUES ($b2, 'race', 'm', 'p')" \
    -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null 2>&1 &
racer=$!
sleep 0.5
out=$(q "INSERT INTO dspark.jobs (batch_id, custom_id, model, prompt) VALUES ($b2, 'race', 'm', 'p')" 2>&1)
wait $racer
tap_like "$out" "jobs_batch_custom_id_key" "of two concurrent inserts of one custom_id into a batch, the later is refused"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE batch_id = $b2 AND custom_id = 'race'")" 1 "... and the first is kept"
tap_like "$(q "SET enable_seqscan = off; EXPLAIN SELECT * FROM dspark.jobs WHERE batch_id = $b1")" \
    "jobs_batch_brin" "a batch's jobs can be found through the BRIN index (this table is too small to need it)"

tap_done
