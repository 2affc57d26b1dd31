#!/bin/sh
# test-sql-rls.sh: roles and row-level security. A client sees, cancels,
# resubmits and reads results of only its own jobs, and adds jobs to its own
# batches only; a worker reads job metadata but never
# prompts or outputs, and changes jobs only through the queue functions,
# which are SECURITY DEFINER with a fixed search_path.
. "${DS_SRCDIR:-$(dirname "$0")/../..}/tests/integration/pg-harness.sh"
pg_harness_start
pg_harness_init
T=$PGH_DIR

q "CREATE ROLE alice LOGIN IN ROLE dspark_client;
   CREATE ROLE bob LOGIN IN ROLE dspark_client;
   CREATE ROLE wendy LOGIN IN ROLE dspark_worker;
   CREATE ROLE adam LOGIN IN ROLE dspark_admin" >/dev/null

dsn() {
    echo "host=$T port=5432 dbname=dspark user=$1"
}
# denied ROLE SQL DESCRIPTION: the statement fails with "permission denied"
denied() {
    _out=$(psql -X -q -A -t -v ON_ERROR_STOP=1 -U "$1" -c "$2" 2>&1)
    if [ $? -ne 0 ] && printf '%s' "$_out" | grep -q "permission denied"; then
        tap_result 0 "$3"
    else
        tap_result 1 "$3"
        printf '%s\n' "$_out" | head -n 3 | sed 's/^/#   got: /'
    fi
}

a1=$("$DSPARKCTL" -d "$(dsn alice)" submit -m m "alice's secret prompt")
tap_ok "a client role can submit with dsparkctl" test -n "$a1"
a2=$("$DSPARKCTL" -d "$(dsn alice)" submit -m m "alice again")
b1=$("$DSPARKCTL" -d "$(dsn bob)" submit -m m "bob's secret prompt")
printf '%s\n' '{"custom_id":"x","method":"POST","url":"/v1/completions","body":{"model":"m","prompt":"bob batch"}}' >"$T/b.jsonl"
bb=$("$DSPARKCTL" -d "$(dsn bob)" submit -q -f "$T/b.jsonl")
tap_is "$(q "SELECT owner FROM dspark.jobs WHERE id = $a1") $(q "SELECT owner FROM dspark.jobs WHERE id = $b1")" "alice bob" \
    "jobs are owned by the submitting role"

tap_is "$(q_as alice "SELECT string_agg(id::text, ',' ORDER BY id) FROM dspark.jobs")" "$a1,$a2" \
    "alice sees only her jobs"
tap_is "$(q_as alice "SELECT count(*) FROM dspark.jobs WHERE prompt LIKE 'bob%'")" 0 "... not bob's prompts"
tap_is "$(q_as alice "SELECT count(*) FROM dspark.batches")" 0 "... nor bob's batch"
out=$("$DSPARKCTL" -d "$(dsn alice)" status --batch "$bb" 2>&1)
tap_like "$out" "batch $bb does not exist \\(or is not yours\\)" "dsparkctl status of another's batch says it is not there"
out=$("$DSPARKCTL" -d "$(dsn alice)" results "$b1" 2>&1)
tap_is "$?" 1 "alice gets no results of bob's job"
tap_is "$(q_as alice "SELECT count(*) FROM dspark.cancel_jobs(ARRAY[$b1]::bigint[])")" 0 "alice cannot cancel bob's job"
out=$("$DSPARKCTL" -d "$(dsn alice)" cancel "$b1" 2>&1)
tap_is "$?" 1 "dsparkctl cancel of another's job fails"
tap_like "$out" "job $b1: not found" "... reporting it as not found"
tap_is "$(q "SELECT state || ' ' || cancel_requested FROM dspark.jobs WHERE id = $b1")" "queued false" "... and bob's job is untouched"
denied alice "UPDATE dspark.jobs SET state = 'succeeded' WHERE id = $a1" "a client cannot change a job's state"
denied alice "UPDATE dspark.jobs SET output_text = 'forged' WHERE id = $a1" "a client cannot write outputs"
denied alice "INSERT INTO dspark.jobs (model, prompt, owner) VALUES ('m', 'x', 'bob')" "a client cannot submit as another owner"
out=$(q_as alice "INSERT INTO dspark.jobs (batch_id, model, prompt) VALUES ($bb, 'm', 'slipped in')" 2>&1)
tap_like "$out" "batch $bb does not exist \\(or is not yours\\)" "a client cannot add a job to another client's batch"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE prompt = 'slipped in'")" 0 "... nothing was added"
# ... nor learn of its custom_ids (the batch's checks ran first), nor tell it from a batch that does not exist
out=$(q_as alice "INSERT INTO dspark.jobs (batch_id, custom_id, model, prompt) VALUES ($bb, 'x', 'm', 'probe')" 2>&1)
tap_like "$out" "batch $bb does not exist \\(or is not yours\\)" "a client's job with a custom_id of another's batch learns nothing of it"
out=$(q_as alice "INSERT INTO dspark.jobs (batch_id, model, prompt) VALUES ($((bb + 1000)), 'm', 'probe')" 2>&1)
tap_like "$out" "batch $((bb + 1000)) does not exist \\(or is not yours\\)" "... and a missing batch gives the same answer"
# join_batches (the insert trigger's, with its owner's rights) is not for direct calls: it would change any batch's
# counter and lock its row
ja=$(q "SELECT jobs_added FROM dspark.batches WHERE id = $bb")
out=$(q_as alice "SELECT dspark.join_batches(ARRAY[$bb]::bigint[], ARRAY[-1000]::bigint[])" 2>&1)
tap_like "$out" "dspark.join_batches is for the triggers of dspark.jobs only" "a client cannot call join_batches on another's batch"
out=$(q_as bob "SELECT dspark.join_batches(ARRAY[$bb]::bigint[], ARRAY[1]::bigint[])" 2>&1)
tap_like "$out" "dspark.join_batches is for the triggers of dspark.jobs only" "... nor on its own"
tap_is "$(q "SELECT jobs_added FROM dspark.batches WHERE id = $bb")" "$ja" "... the counter is untouched"
denied alice "INSERT INTO dspark.jobs (model, prompt, state) VALUES ('m', 'x', 'succeeded')" "a client cannot insert a finished job"
denied alice "DELETE FROM dspark.jobs" "a client cannot delete jobs"
denied alice "SELECT * FROM dspark.claim_jobs('evil', 10, NULL, 60)" "a client cannot claim jobs"
denied alice "SELECT dspark.prune('0 s')" "a client cannot prune"
denied alice "INSERT INTO dspark.job_stats (job_id, attempt, owner) VALUES ($a1, 1, 'alice')" "a client cannot write statistics"
tap_is "$(q_as alice "SELECT state FROM dspark.cancel_jobs(ARRAY[$a1]::bigint[])")" cancelled "alice can cancel her own job"
tap_is "$(q_as alice "SELECT (queued + running + succeeded + failed + cancelled)::text FROM dspark.queue_status")" 4 \
    "queue_status counts every owner's jobs (no content)"

# the worker role
denied wendy "SELECT prompt FROM dspark.jobs" "a worker cannot read prompts"
denied wendy "SELECT messages FROM dspark.jobs" "... nor chat messages"
denied wendy "SELECT output_text FROM dspark.jobs" "... nor outputs"
denied wendy "SELECT * FROM dspark.job_results" "... nor the results view"
tap_is "$(q_as wendy "SELECT count(*) FROM dspark.jobs")" 4 "a worker reads job metadata of every owner"
tap_is "$(q_as wendy "SELECT state FROM dspark.jobs WHERE id = $b1")" queued "... e.g. the state (what dsparkd publishes)"
tap_is "$(q_as wendy "SELECT (SELECT count(*) FROM dspark.jobs WHERE state = 'queued' AND NOT delayed) + (SELECT count(*) FROM dspark.jobs WHERE state = 'queued' AND delayed)")" \
    "$(q "SELECT count(*) FROM dspark.jobs WHERE state = 'queued'")" "... and whether queued jobs are delayed (dsparkd's count)"
tap_is "$(q_as wendy "SELECT dspark.promote_due_jobs(NULL, 2000)")" 0 "... and may let delayed jobs that came due join the queue (dsparkd's pass)"
denied wendy "UPDATE dspark.jobs SET state = 'running'" "a worker cannot update jobs directly"
denied alice "INSERT INTO dspark.client_shares VALUES ('alice', 100)" "a client cannot give itself a share of the turns"
denied wendy "SELECT * FROM dspark.client_shares" "... nor may a worker read the shares"
tap_is "$(q_as adam "INSERT INTO dspark.client_shares VALUES ('alice', 2) RETURNING share")" 2 "an admin sets a client's share"
q "DELETE FROM dspark.client_shares" >/dev/null
denied wendy "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'x')" "a worker cannot insert jobs"
denied wendy "DELETE FROM dspark.jobs" "a worker cannot delete jobs"
denied wendy "CREATE TABLE dspark.evil (x int)" "a worker cannot create objects in the schema"
q_as wendy "SELECT dspark.register_worker('wendy-0', 'h', 1, 'cpu', 'm', 'd', 'c1', 'c2', NULL)" >/dev/null
claimed=$(q_as wendy "SELECT id || '=' || coalesce(prompt, '') FROM dspark.claim_jobs('wendy-0', 10, NULL, 60) ORDER BY id")
tap_like "$claimed" "^$a2=alice again" "a worker gets the prompts of the jobs it claims"
tap_like "$claimed" "$b1=bob's secret prompt" "... of every owner"
out=$(q_as wendy "SELECT applied FROM dspark.finish_jobs('wendy-0', '[{\"id\": $b1, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"done\", \"stats\": {\"output_tokens\": 1}}]')")
tap_is "$out" t "a worker writes back through finish_jobs"
tap_is "$(q_as bob "SELECT output_text || ' ' || s.output_tokens FROM dspark.jobs j JOIN dspark.job_stats s ON s.job_id = j.id WHERE j.id = $b1")" "done 1" \
    "the owner reads the output and statistics"
tap_is "$(q_as alice "SELECT count(*) FROM dspark.job_stats")" 0 "another client does not see those statistics"
tap_ok "a worker may run the reaper" q_as wendy "SELECT dspark.requeue_expired()"
denied wendy "SELECT * FROM dspark.cancel_jobs(ARRAY[$a2]::bigint[])" "a worker cannot use the client's cancel"
tap_ok "a worker may announce itself as starting" q_as wendy "SELECT dspark.worker_starting('wendy-1', 'h', 2, 'cpu', 'm')"
tap_ok "... and claim jobs of an unserved model" q_as wendy "SELECT count(*) FROM dspark.claim_unserved('wendy-1', 'none', 1, 60)"
tap_ok "... and claim jobs as the process that holds its row" q_as wendy "SELECT count(*) FROM dspark.claim_jobs_held(NULL, 'wendy-1', 0, NULL, 60)"
denied alice "SELECT * FROM dspark.claim_jobs_held(NULL, 'wendy-1', 0, NULL, 60)" "a client cannot claim jobs that way either"
tap_ok "... and sweep an unserved model's jobs as the process that holds its row" q_as wendy "SELECT count(*) FROM dspark.claim_unserved_held(NULL, 'wendy-1', 'none', 1, 60)"
denied alice "SELECT * FROM dspark.claim_unserved_held(NULL, 'wendy-1', 'none', 1, 60)" "a client cannot sweep jobs either"
denied alice "SELECT dspark.worker_starting('alice-0', 'h', 3, 'cpu', 'm')" "a client cannot pose as a worker"

# SECURITY DEFINER functions run with a fixed search_path, no one else may run them
tap_is "$(q "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'dspark' AND p.prosecdef AND NOT EXISTS (SELECT FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')")" 0 \
    "every SECURITY DEFINER function sets search_path"
tap_is "$(q "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'dspark' AND p.prosecdef")" 16 \
    "... (there are 16 of them)"
tap_is "$(q "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'dspark' AND p.prosecdef AND has_function_privilege('public', p.oid, 'EXECUTE')")" 0 \
    "... and PUBLIC may execute none of them"

# the admin role sees everything
tap_is "$(q_as adam "SELECT count(*) FROM dspark.jobs WHERE prompt IS NOT NULL")" 4 "an admin sees every job with its prompt"

# resubmitting a batch: only one's own, and the copies keep their owner
q "UPDATE dspark.jobs SET state = 'failed', finished_at = now(), error = 'boom' WHERE batch_id = $bb" >/dev/null
out=$("$DSPARKCTL" -d "$(dsn alice)" resubmit "$bb" 2>&1)
tap_is "$?" 1 "alice cannot resubmit bob's batch"
tap_like "$out" "batch $bb does not exist \\(or is not yours\\)" "... it is not there for her"
tap_is "$(q "SELECT count(*) FROM dspark.batches")" 1 "... and no batch was made"
denied wendy "SELECT * FROM dspark.resubmit_batch($bb)" "a worker cannot resubmit"
nb=$("$DSPARKCTL" -d "$(dsn bob)" resubmit -q "$bb")
tap_is "$(q "SELECT b.owner || ' ' || string_agg(j.owner || ':' || j.custom_id || ':' || j.state, ',') FROM dspark.batches b JOIN dspark.jobs j ON j.batch_id = b.id WHERE b.id = ${nb:-0} GROUP BY b.owner")" \
    "bob bob:x:queued" "bob resubmits his failed job as his own new batch"
nb2=$(q_as adam "SELECT batch_id FROM dspark.resubmit_batch($bb)")
tap_is "$(q "SELECT b.owner || ' ' || string_agg(j.owner, ',') FROM dspark.batches b JOIN dspark.jobs j ON j.batch_id = b.id WHERE b.id = ${nb2:-0} GROUP BY b.owner")" \
    "bob bob" "an admin's resubmission keeps the jobs' owner"
ab=$(q_as adam "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
q_as adam "INSERT INTO dspark.jobs (batch_id, model, prompt, owner, state) VALUES ($ab, 'm', 'for bob', 'bob', 'queued')" >/dev/null
q "UPDATE dspark.jobs SET state = 'cancelled', finished_at = now() WHERE batch_id = $ab" >/dev/null
nb3=$(q_as adam "SELECT batch_id FROM dspark.resubmit_batch($ab)")
tap_is "$(q "SELECT b.owner || ' ' || string_agg(j.owner, ',') FROM dspark.batches b JOIN dspark.jobs j ON j.batch_id = b.id WHERE b.id = ${nb3:-0} GROUP BY b.owner")" \
    "adam bob" "an admin resubmitting its own batch keeps another role's job that role's"

tap_done
