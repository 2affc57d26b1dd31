-- 003-throughput.sql: cheaper submission, claims and write-backs, same rules.
--
-- 1. The batch reference of dspark.jobs is checked once per statement
--    instead of once per row. A foreign key runs one lookup (and one row
--    lock) per inserted job, which cost a quarter of a 100,000-job COPY; the
--    statement triggers below do what it did, with the same error codes and
--    messages: an insert or update naming a batch that does not exist is
--    refused (23503, "jobs_batch_id_fkey"), the referenced batches are locked
--    FOR KEY SHARE until the end of the transaction (so a concurrent delete
--    waits), deleting a batch deletes its jobs, changing the id of a batch
--    that has jobs is refused, and so is TRUNCATE of dspark.batches while
--    jobs still reference it (truncate both tables together instead).
-- 2. The notify triggers cut their payloads in one pass, and each entry says
--    what the change was: "id:version:state:attempt" (state as its first
--    letter), comma-separated, at most about 7000 bytes per notification, so
--    that a listener learns every state change even when a job went through
--    several before it could read the row (see dspark.jobs_after_update).
-- 3. dspark.claim_jobs locks and updates its jobs in one statement instead of
--    collecting ids and finding the rows again.
-- 4. dspark.finish_job_results(text, dspark.job_result[]): the write-back of
--    dspark.finish_jobs taking an array of rows (one per finished job,
--    statistics included) instead of a JSON document, so nothing is decoded
--    twice; dspark.finish_jobs(text, jsonb) stays, as a wrapper that converts
--    its items to rows. (A new name rather than an overload: a call with an
--    untyped literal must keep resolving to the JSON form.)

-- 1. The batch reference --------------------------------------------------------

ALTER TABLE dspark.jobs DROP CONSTRAINT jobs_batch_id_fkey;

-- Lock the given batches FOR KEY SHARE, or fail as the foreign key did when
-- one does not exist. Runs with its owner's rights, as foreign key checks do:
-- row-level security does not hide the batch, and the caller needs no UPDATE
-- privilege on dspark.batches for the lock.
CREATE FUNCTION dspark.lock_batches(p_ids bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
    missing bigint;
BEGIN
    SELECT count(*) INTO n
    FROM (SELECT b.id FROM dspark.batches b WHERE b.id = ANY (p_ids) FOR KEY SHARE) l;
    IF n < cardinality(p_ids) THEN
        SELECT min(u.id) INTO missing
        FROM unnest(p_ids) AS u(id)
        WHERE NOT EXISTS (SELECT FROM dspark.batches b WHERE b.id = u.id);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'insert or update on table "jobs" violates foreign key constraint "jobs_batch_id_fkey"'
                USING ERRCODE = 'foreign_key_violation',
                      DETAIL = format('Key (batch_id)=(%s) is not present in table "batches".', missing),
                      SCHEMA = 'dspark', TABLE = 'jobs', CONSTRAINT = 'jobs_batch_id_fkey';
        END IF;
    END IF;
END
$$;
COMMENT ON FUNCTION dspark.lock_batches IS 'the batch reference check of dspark.jobs (called by its statement triggers)';
REVOKE EXECUTE ON FUNCTION dspark.lock_batches(bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.lock_batches(bigint[])
    TO dspark_client, dspark_worker, dspark_admin;

-- Deleting batches deletes their jobs (and so the jobs' statistics). Only
-- the owner and dspark_admin may delete, update or truncate batches, and both
-- may do the same to jobs, so these run with the caller's rights (and, as
-- trigger functions, name every object with its schema).
CREATE FUNCTION dspark.batches_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM dspark.jobs j USING old_rows o WHERE j.batch_id = o.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER batches_after_delete AFTER DELETE ON dspark.batches
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dspark.batches_after_delete();

-- The id of a batch that has jobs does not change.
CREATE FUNCTION dspark.batches_after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    gone bigint;
BEGIN
    SELECT o.id INTO gone
    FROM old_rows o
    WHERE NOT EXISTS (SELECT FROM new_rows n WHERE n.id = o.id)
      AND EXISTS (SELECT FROM dspark.jobs j WHERE j.batch_id = o.id)
    LIMIT 1;
    IF gone IS NOT NULL THEN
        RAISE EXCEPTION 'update or delete on table "batches" violates foreign key constraint "jobs_batch_id_fkey" on table "jobs"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = pg_catalog.format('Key (id)=(%s) is still referenced from table "jobs".', gone),
                  SCHEMA = 'dspark', TABLE = 'batches', CONSTRAINT = 'jobs_batch_id_fkey';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER batches_after_update AFTER UPDATE ON dspark.batches
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dspark.batches_after_update();

-- TRUNCATE of the batches alone would leave jobs without their batch.
CREATE FUNCTION dspark.batches_after_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM dspark.jobs j WHERE j.batch_id IS NOT NULL) THEN
        RAISE EXCEPTION 'cannot truncate a table referenced in a foreign key constraint'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Table "jobs" references "batches".',
                  HINT = 'Truncate table "jobs" at the same time.';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER batches_after_truncate AFTER TRUNCATE ON dspark.batches
    FOR EACH STATEMENT EXECUTE FUNCTION dspark.batches_after_truncate();

REVOKE EXECUTE ON FUNCTION dspark.batches_after_delete(), dspark.batches_after_update(),
    dspark.batches_after_truncate() FROM PUBLIC;

-- 2. Notifications (and the batch check) ------------------------------------------
-- (Trigger functions run with the rights of whoever changes the rows; see 001.)

-- Notification payloads (channel 'dspark_events'): one entry per job whose
-- state a statement set, "id:version:state:attempt", comma-separated:
--   12:1:q:0,13:1:q:0         two jobs inserted (version 1, attempt 0)
--   12:2:r:1                  claimed: running, version 2, attempt 1
--   12:3:s:1                  finished: succeeded at version 3
-- The state is the first letter of its name (queued, running, succeeded,
-- failed, cancelled: q r s f c, all distinct). Entries are cut into payloads
-- of at most about 7000 bytes (the limit is 8000) by a running sum of their
-- lengths. Since each entry names its version, the payloads of a transaction
-- that changes one job several times all differ, so PostgreSQL delivers each
-- (it folds identical payloads of one transaction into one).

-- Send entries on 'dspark_events', cut into payloads of at most about 7000
-- bytes by a running sum of their lengths (in array order).
CREATE FUNCTION dspark.notify_job_changes(p_entries text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    FOR payload IN
        SELECT pg_catalog.string_agg(c.entry, ',' ORDER BY c.i)
        FROM (SELECT e.entry, e.i,
                     pg_catalog.sum(pg_catalog.length(e.entry) + 1) OVER (ORDER BY e.i) / 7000 AS chunk
              FROM pg_catalog.unnest(p_entries) WITH ORDINALITY AS e(entry, i)) c
        GROUP BY c.chunk
        ORDER BY c.chunk
    LOOP
        PERFORM pg_catalog.pg_notify('dspark_events', payload);
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION dspark.notify_job_changes(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.notify_job_changes(text[]) TO dspark_client, dspark_worker, dspark_admin;

-- Inserts: check the batches, then notify the new jobs.
CREATE OR REPLACE FUNCTION dspark.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bids bigint[];
BEGIN
    SELECT pg_catalog.array_agg(b.batch_id) INTO bids
    FROM (SELECT DISTINCT n.batch_id FROM new_rows n WHERE n.batch_id IS NOT NULL) b;
    IF bids IS NOT NULL THEN
        PERFORM dspark.lock_batches(bids);
    END IF;
    PERFORM dspark.notify_job_changes(ARRAY(
        SELECT n.id::text || ':' || n.version::text || ':' || pg_catalog.left(n.state, 1) || ':' || n.attempt::text
        FROM new_rows n));
    RETURN NULL;
END
$$;

-- Updates: the jobs whose state changed, with their new version, state and
-- attempt (updates that change no state, such as heartbeats, notify nothing),
-- and the batch check for rows whose batch_id changed (only ad-hoc SQL does
-- that).
CREATE OR REPLACE FUNCTION dspark.jobs_after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bids bigint[];
BEGIN
    IF EXISTS (SELECT FROM new_rows n JOIN old_rows o ON o.id = n.id
               WHERE n.batch_id IS DISTINCT FROM o.batch_id) THEN
        SELECT pg_catalog.array_agg(DISTINCT n.batch_id) INTO bids
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.batch_id IS DISTINCT FROM o.batch_id AND n.batch_id IS NOT NULL;
        IF bids IS NOT NULL THEN
            PERFORM dspark.lock_batches(bids);
        END IF;
    END IF;
    PERFORM dspark.notify_job_changes(ARRAY(
        SELECT n.id::text || ':' || n.version::text || ':' || pg_catalog.left(n.state, 1) || ':' || n.attempt::text
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.state <> o.state));
    RETURN NULL;
END
$$;

-- 3. Claims ------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dspark.claim_jobs(
    p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- lock the candidates (the locks last until the caller commits), admit
    -- a prefix within the budget, and update them in the same statement (the
    -- ids as an array, so that the update finds them by primary key)
    IF p_token_budget IS NULL THEN
        RETURN QUERY
        WITH claimed AS (
            UPDATE dspark.jobs j
            SET state = 'running', attempt = j.attempt + 1, worker_id = p_worker_id,
                version = j.version + 1, started_at = now(),
                lease_expires_at = now() + make_interval(secs => greatest(p_lease_seconds, 1))
            WHERE j.id = ANY (ARRAY(
                SELECT c.id
                FROM dspark.jobs c
                WHERE c.state = 'queued' AND c.run_after <= now()
                  AND (p_models IS NULL OR c.model = ANY (p_models))
                ORDER BY c.priority DESC, c.id
                LIMIT greatest(p_max_jobs, 0)
                FOR UPDATE SKIP LOCKED))
            RETURNING j.*
        )
        SELECT * FROM claimed cl ORDER BY cl.priority DESC, cl.id;
    ELSE
        RETURN QUERY
        WITH claimed AS (
            UPDATE dspark.jobs j
            SET state = 'running', attempt = j.attempt + 1, worker_id = p_worker_id,
                version = j.version + 1, started_at = now(),
                lease_expires_at = now() + make_interval(secs => greatest(p_lease_seconds, 1))
            WHERE j.id = ANY (ARRAY(
                SELECT s.id
                FROM (SELECT cd.id,
                             sum(cd.cost) OVER (ORDER BY cd.priority DESC, cd.id) AS running_total
                      FROM (SELECT c.id, c.priority,
                                   dspark.prompt_tokens_est(c.prompt, c.messages, c.prompt_ids)
                                       + c.max_tokens AS cost
                            FROM dspark.jobs c
                            WHERE c.state = 'queued' AND c.run_after <= now()
                              AND (p_models IS NULL OR c.model = ANY (p_models))
                            ORDER BY c.priority DESC, c.id
                            LIMIT greatest(p_max_jobs, 0)
                            FOR UPDATE SKIP LOCKED) cd) s
                WHERE s.running_total <= p_token_budget))
            RETURNING j.*
        )
        SELECT * FROM claimed cl ORDER BY cl.priority DESC, cl.id;
    END IF;
END
$$;

-- 4. Write-backs --------------------------------------------------------------------

-- One finished job: its final state, output, and the statistics of the
-- attempt (the columns of dspark.job_stats from device to mean_verify_len).
CREATE TYPE dspark.job_result AS (
    id                  bigint,
    attempt             int,
    state               text,
    output_text         text,
    output_ids          int[],
    finish_reason       text,
    error               text,
    device              text,
    model               text,
    draft               text,
    model_checksum      text,
    draft_checksum      text,
    queue_wait_s        float8,
    time_to_first_token_s float8,
    e2e_latency_s       float8,
    decode_tokens_per_s float8,
    prompt_tokens       int,
    output_tokens       int,
    rounds              int,
    num_draft_tokens    bigint,
    num_verified_tokens bigint,
    num_accepted_tokens bigint,
    mean_acceptance_length float8,
    acceptance_by_position int[],
    verified_by_position   int[],
    mean_verify_len     float8
);
COMMENT ON TYPE dspark.job_result IS 'one item of a write-back (dspark.finish_job_results)';
GRANT USAGE ON TYPE dspark.job_result TO dspark_worker, dspark_admin;

-- Write back finished jobs, one call per round. Each item is applied only if
-- the job is still running under this worker and attempt (the fence); a stale
-- one is refused. A NULL queue_wait_s or e2e_latency_s is computed from the
-- job's times. Returns (id, applied) per item, by id.
CREATE FUNCTION dspark.finish_job_results(p_worker_id text, p_results dspark.job_result[])
RETURNS TABLE (id bigint, applied boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_nestloop = off AS $$
DECLARE
    bad text;
    ids bigint[];
BEGIN
    IF p_results IS NULL THEN
        RAISE EXCEPTION 'finish_jobs: results must be an array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(x.id),
           min(coalesce(x.state, 'null'))
               FILTER (WHERE x.state IS NULL
                       OR x.state NOT IN ('succeeded', 'failed', 'cancelled'))
    INTO ids, bad
    FROM unnest(p_results) x;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'finish_jobs: invalid final state ''%''', bad
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a result''s state is succeeded, failed or cancelled';
    END IF;
    RETURN QUERY
    WITH r AS (
        SELECT DISTINCT ON (x.id) x.*
        FROM unnest(p_results) x
        ORDER BY x.id
    ), done AS (
        UPDATE dspark.jobs j
        SET state = r.state, version = j.version + 1, finished_at = now(),
            lease_expires_at = NULL, output_text = r.output_text, output_ids = r.output_ids,
            finish_reason = coalesce(r.finish_reason,
                                     CASE r.state WHEN 'failed' THEN 'error'
                                                  WHEN 'cancelled' THEN 'cancelled' END),
            error = r.error
        FROM r
        WHERE j.id = ANY (ids) AND j.id = r.id AND j.attempt = r.attempt
          AND j.state = 'running' AND j.worker_id = p_worker_id
        RETURNING j.id, j.attempt, j.owner, j.created_at, j.run_after, j.started_at,
                  j.finished_at, j.finish_reason, r.device, r.model, r.draft,
                  r.model_checksum, r.draft_checksum, r.queue_wait_s,
                  r.time_to_first_token_s, r.e2e_latency_s, r.decode_tokens_per_s,
                  r.prompt_tokens, r.output_tokens, r.rounds, r.num_draft_tokens,
                  r.num_verified_tokens, r.num_accepted_tokens, r.mean_acceptance_length,
                  r.acceptance_by_position, r.verified_by_position, r.mean_verify_len
    ), stats AS (
        INSERT INTO dspark.job_stats (
            job_id, attempt, owner, worker_id, device, model, draft, model_checksum,
            draft_checksum, queue_wait_s, time_to_first_token_s, e2e_latency_s,
            decode_tokens_per_s, prompt_tokens, output_tokens, rounds, num_draft_tokens,
            num_verified_tokens, num_accepted_tokens, mean_acceptance_length,
            acceptance_by_position, verified_by_position, mean_verify_len, finish_reason)
        SELECT d.id, d.attempt, d.owner, p_worker_id, d.device, d.model, d.draft,
               d.model_checksum, d.draft_checksum,
               coalesce(d.queue_wait_s, extract(epoch FROM d.started_at
                                                - greatest(d.created_at, d.run_after))::float8),
               d.time_to_first_token_s,
               coalesce(d.e2e_latency_s, extract(epoch FROM d.finished_at - d.created_at)::float8),
               d.decode_tokens_per_s, d.prompt_tokens, d.output_tokens, d.rounds,
               d.num_draft_tokens, d.num_verified_tokens, d.num_accepted_tokens,
               d.mean_acceptance_length, d.acceptance_by_position, d.verified_by_position,
               d.mean_verify_len, d.finish_reason
        FROM done d
    )
    SELECT r.id, d.id IS NOT NULL
    FROM r LEFT JOIN done d ON d.id = r.id
    ORDER BY r.id;
END
$$;
COMMENT ON FUNCTION dspark.finish_job_results(text, dspark.job_result[]) IS
    'fenced write-back of finished jobs with their statistics';

-- The JSON form of 002: p_results is a JSON array of
--   {"id": 12, "attempt": 1, "state": "succeeded"|"failed"|"cancelled",
--    "output_text": "...", "output_ids": [..], "finish_reason": "stop"|"length"|...,
--    "error": "...", "stats": {columns of dspark.job_stats, from device to
--    mean_verify_len; others are ignored}}
CREATE OR REPLACE FUNCTION dspark.finish_jobs(p_worker_id text, p_results jsonb)
RETURNS TABLE (id bigint, applied boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    items dspark.job_result[];
BEGIN
    IF jsonb_typeof(p_results) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'finish_jobs: results must be a JSON array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT coalesce(array_agg(ROW(x.id, x.attempt, x.state, x.output_text, x.output_ids,
                                  x.finish_reason, x.error, s.device, s.model, s.draft,
                                  s.model_checksum, s.draft_checksum, s.queue_wait_s,
                                  s.time_to_first_token_s, s.e2e_latency_s,
                                  s.decode_tokens_per_s, s.prompt_tokens, s.output_tokens,
                                  s.rounds, s.num_draft_tokens, s.num_verified_tokens,
                                  s.num_accepted_tokens, s.mean_acceptance_length,
                                  s.acceptance_by_position, s.verified_by_position,
                                  s.mean_verify_len)::dspark.job_result), '{}')
    INTO items
    FROM jsonb_to_recordset(p_results) AS x(id bigint, attempt int, state text,
         output_text text, output_ids int[], finish_reason text, error text, stats jsonb)
    CROSS JOIN LATERAL jsonb_to_record(coalesce(x.stats, '{}')) AS s(
        device text, model text, draft text, model_checksum text, draft_checksum text,
        queue_wait_s float8, time_to_first_token_s float8, e2e_latency_s float8,
        decode_tokens_per_s float8, prompt_tokens int, output_tokens int, rounds int,
        num_draft_tokens bigint, num_verified_tokens bigint, num_accepted_tokens bigint,
        mean_acceptance_length float8, acceptance_by_position int[],
        verified_by_position int[], mean_verify_len float8);
    RETURN QUERY SELECT f.id, f.applied FROM dspark.finish_job_results(p_worker_id, items) f;
END
$$;

REVOKE EXECUTE ON FUNCTION dspark.finish_job_results(text, dspark.job_result[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.finish_job_results(text, dspark.job_result[])
    TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (3, '003-throughput');
