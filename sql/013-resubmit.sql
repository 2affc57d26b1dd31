-- 013-resubmit.sql: a batch's unsuccessful jobs sent again as a new batch.
--
-- A job that failed on its last attempt, or was cancelled (or expired, 012),
-- keeps the state it ended in: finished states are final, and clients
-- (dsparkctl wait, watch and results, the events) rely on that. The OpenAI
-- Batch API has the same rule, and there one sends the failed requests again
-- as a new batch. dspark.resubmit_batch does that in one statement. It copies
-- the requests of the batch's jobs in the given finished states into a new
-- batch: the same custom_id, model, prompt and parameters, a fresh count of
-- attempts, and a deadline as far from now as it was from the job's creation.
-- run_alone, which clients cannot set, starts false again: a job that crashes
-- its worker again is found out as before (007). The new batch keeps the old
-- one's metadata and adds resubmit_of and resubmit_states.
--
-- It runs with the caller's rights, so a client resubmits only its own
-- batches, and its copies are its own (owner takes its default). A caller
-- that may name owners (an admin) keeps each job's owner and the batch's.

CREATE FUNCTION dspark.resubmit_batch(
    p_batch_id bigint, p_states text[] DEFAULT ARRAY['failed', 'cancelled'])
RETURNS TABLE (batch_id bigint, jobs bigint, first_id bigint, last_id bigint)
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_batch bigint;
    v_jobs bigint;
    v_batch_owner text;   -- 'owner, ' when the caller may name the batch's owner, else ''
    v_job_owner text;     -- the same for the jobs'
BEGIN
    IF p_states IS NULL OR cardinality(p_states) = 0
       OR array_position(p_states, NULL) IS NOT NULL
       OR NOT p_states <@ ARRAY['succeeded', 'failed', 'cancelled'] THEN
        RAISE EXCEPTION 'the states to resubmit must be among succeeded, failed and cancelled'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM dspark.batches b WHERE b.id = p_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch % does not exist (or is not yours)', p_batch_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM dspark.jobs j WHERE j.batch_id = p_batch_id AND j.state = ANY (p_states)) THEN
        RETURN;   -- nothing to send again, and no empty batch
    END IF;
    v_batch_owner := CASE WHEN has_column_privilege('dspark.batches', 'owner', 'INSERT') THEN 'owner, ' ELSE '' END;
    v_job_owner := CASE WHEN has_column_privilege('dspark.jobs', 'owner', 'INSERT') THEN 'owner, ' ELSE '' END;
    BEGIN
        EXECUTE format('INSERT INTO dspark.batches (%smetadata) SELECT %smetadata || $2 FROM dspark.batches b '
                       'WHERE b.id = $1 RETURNING id', v_batch_owner, v_batch_owner)
            INTO v_batch
            USING p_batch_id, jsonb_build_object('resubmit_of', p_batch_id, 'resubmit_states', to_jsonb(p_states));
        IF v_batch IS NULL THEN
            RETURN;   -- the batch went away meanwhile (retention, or deleted)
        END IF;
        EXECUTE format('INSERT INTO dspark.jobs (batch_id, custom_id, %smodel, prompt, messages, prompt_ids, '
                       'max_tokens, temperature, top_p, top_k, seed, stop, spec_mode, priority, max_attempts, '
                       'expires_at) '
                       'SELECT $1, custom_id, %smodel, prompt, messages, prompt_ids, max_tokens, temperature, '
                       'top_p, top_k, seed, stop, spec_mode, priority, max_attempts, '
                       'now() + (expires_at - created_at) FROM dspark.jobs '
                       'WHERE batch_id = $2 AND state = ANY ($3) ORDER BY id', v_job_owner, v_job_owner)
            USING v_batch, p_batch_id, p_states;
        GET DIAGNOSTICS v_jobs = ROW_COUNT;
        IF v_jobs = 0 THEN   -- the jobs went away meanwhile: undo the empty batch
            RAISE EXCEPTION USING ERRCODE = 'DSR01';
        END IF;
    EXCEPTION WHEN SQLSTATE 'DSR01' THEN
        RETURN;
    END;
    RETURN QUERY
    SELECT v_batch, count(*), min(n.id), max(n.id) FROM dspark.jobs n WHERE n.batch_id = v_batch;
END
$$;
COMMENT ON FUNCTION dspark.resubmit_batch IS 'a new batch of the requests of a batch''s jobs in the given finished states (default failed and cancelled); no rows when there are none';

-- A job joins only a batch its inserting role can see (sql/004's join_batches
-- checks, with its owner's rights, only that the batch exists): so a client
-- adds jobs to its own batches only, as the rows' owner policy already
-- requires of the jobs themselves. Found while reviewing resubmission: an
-- admin's resubmission of a batch copied a job another client had slipped in.
-- The trigger function of 004, with that check.
CREATE OR REPLACE FUNCTION dspark.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bids bigint[];
    counts bigint[];
    dup record;
    other bigint;
BEGIN
    SELECT pg_catalog.array_agg(b.batch_id ORDER BY b.batch_id),
           pg_catalog.array_agg(b.n ORDER BY b.batch_id)
    INTO bids, counts
    FROM (SELECT n.batch_id, pg_catalog.count(*) AS n FROM new_rows n
          WHERE n.batch_id IS NOT NULL GROUP BY n.batch_id) b;
    IF bids IS NOT NULL THEN
        PERFORM dspark.join_batches(bids, counts);
        -- the inserting role must see each batch: a client adds jobs to its own batches only
        SELECT u.id INTO other FROM pg_catalog.unnest(bids) AS u(id)
        WHERE NOT EXISTS (SELECT FROM dspark.batches b WHERE b.id = u.id) LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'batch % does not exist (or is not yours)', other
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        SELECT n.batch_id, n.custom_id INTO dup
        FROM new_rows n
        WHERE n.batch_id IS NOT NULL AND n.custom_id IS NOT NULL
        GROUP BY n.batch_id, n.custom_id
        HAVING pg_catalog.count(*) > 1
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "jobs_batch_custom_id_key"'
                USING ERRCODE = 'unique_violation',
                      DETAIL = pg_catalog.format('Key (batch_id, custom_id)=(%s, %s) already exists.',
                                                 dup.batch_id, dup.custom_id),
                      SCHEMA = 'dspark', TABLE = 'jobs', CONSTRAINT = 'jobs_batch_custom_id_key';
        END IF;
    END IF;
    PERFORM dspark.notify_job_changes(ARRAY(
        SELECT dspark.job_change(n.id, n.version, n.state, n.attempt) FROM new_rows n));
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION dspark.resubmit_batch(bigint, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.resubmit_batch(bigint, text[]) TO dspark_client, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (13, '013-resubmit');
