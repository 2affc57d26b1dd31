-- 012-resubmit.sql: a batch's unsuccessful jobs sent again as a new batch.
--
-- A job that failed on its last attempt, or was cancelled, keeps the state it
-- ended in: finished states are final, and clients (dsparkctl wait, watch and
-- results, the events) rely on that. The OpenAI Batch API has the same rule,
-- and there one sends the failed requests again as a new batch.
-- dspark.resubmit_batch does that in one statement. It copies the requests of
-- the batch's jobs in the given finished states into a new batch: the same
-- custom_id, owner, model, prompt and parameters, and a fresh count of
-- attempts (run_alone, which clients cannot set, starts false again: a job that
-- crashes its worker again is found out as before, sql/007). The new batch keeps
-- the old one's metadata and adds resubmit_of and resubmit_states. It runs with
-- the caller's rights, so a client resubmits only its own batches.

CREATE FUNCTION dspark.resubmit_batch(
    p_batch_id bigint, p_states text[] DEFAULT ARRAY['failed', 'cancelled'])
RETURNS TABLE (batch_id bigint, jobs bigint, first_id bigint, last_id bigint)
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_batch bigint;
    v_owner name;
    v_owner_col text;
BEGIN
    IF p_states IS NULL OR cardinality(p_states) = 0
       OR array_position(p_states, NULL) IS NOT NULL
       OR NOT p_states <@ ARRAY['succeeded', 'failed', 'cancelled'] THEN
        RAISE EXCEPTION 'the states to resubmit must be among succeeded, failed and cancelled'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT b.owner INTO v_owner FROM dspark.batches b WHERE b.id = p_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch % does not exist (or is not yours)', p_batch_id
            USING ERRCODE = 'no_data_found';
    END IF;
    -- finished states are final: what is found here is still there below
    IF NOT EXISTS (SELECT 1 FROM dspark.jobs j WHERE j.batch_id = p_batch_id AND j.state = ANY (p_states)) THEN
        RETURN;   -- nothing to send again, and no empty batch
    END IF;
    -- A client inserts neither owner (it defaults to the client) nor run_alone;
    -- an admin resubmitting another role's batch names the owners.
    v_owner_col := CASE WHEN v_owner = current_user THEN '' ELSE 'owner, ' END;
    EXECUTE format('INSERT INTO dspark.batches (%smetadata) SELECT %smetadata || $2 FROM dspark.batches b '
                   'WHERE b.id = $1 RETURNING id', v_owner_col, v_owner_col)
        INTO v_batch
        USING p_batch_id, jsonb_build_object('resubmit_of', p_batch_id, 'resubmit_states', to_jsonb(p_states));
    EXECUTE format('INSERT INTO dspark.jobs (batch_id, custom_id, %smodel, prompt, messages, prompt_ids, max_tokens, '
                   'temperature, top_p, top_k, seed, stop, spec_mode, priority, max_attempts) '
                   'SELECT $1, custom_id, %smodel, prompt, messages, prompt_ids, max_tokens, temperature, top_p, '
                   'top_k, seed, stop, spec_mode, priority, max_attempts FROM dspark.jobs '
                   'WHERE batch_id = $2 AND state = ANY ($3) ORDER BY id', v_owner_col, v_owner_col)
        USING v_batch, p_batch_id, p_states;
    RETURN QUERY
    SELECT v_batch, count(*), min(n.id), max(n.id) FROM dspark.jobs n WHERE n.batch_id = v_batch;
END
$$;
COMMENT ON FUNCTION dspark.resubmit_batch IS 'a new batch of the requests of a batch''s jobs in the given finished states (default failed and cancelled); no rows when there are none';

REVOKE EXECUTE ON FUNCTION dspark.resubmit_batch(bigint, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.resubmit_batch(bigint, text[]) TO dspark_client, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (12, '012-resubmit');
