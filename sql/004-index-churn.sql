-- 004-index-churn.sql: fewer index entries and no statement trigger on the
-- hot path of claims and write-backs; same rules, same notifications.
--
-- A state change of a job is never a HOT update (state is in the partial
-- indexes' predicates), so every claim and write-back adds a new entry to
-- every index of dspark.jobs whose predicate holds for the new row version,
-- and every UPDATE paid the statement trigger of 003, which copies the old and
-- new rows of the statement into transition tables. Measured with
-- bench/bench-queue.sh, those were the largest costs against a plain queue.
--
-- 1. The jobs of a batch are found through a BRIN index on batch_id
--    (jobs_batch_brin) instead of the unique B-tree on (batch_id, custom_id),
--    which took an entry per row version. A batch's jobs are inserted together
--    and claimed together, so their row versions stay on neighbouring pages.
--    custom_id stays unique within its batch: the insert trigger, and a row
--    trigger on changes of batch_id or custom_id, lock the batches concerned
--    (FOR NO KEY UPDATE: concurrent inserts into one batch take turns) and
--    look for a repeated custom_id, raising the error the index raised
--    (23505, constraint "jobs_batch_custom_id_key"). The new column
--    dspark.batches.jobs_added counts the jobs ever added to a batch: a
--    statement that fills a new batch (dsparkctl submit) compares its own
--    rows only; one that adds to a batch that had jobs reads the whole batch,
--    so adding jobs one statement at a time to a batch of n jobs costs O(n)
--    each.
-- 2. The statement trigger jobs_after_update, with its transition tables, is
--    gone. An update that bumps version itself takes over the duties of
--    jobs_before_update: keeping to the state machine and notifying every
--    state change it makes. The queue functions (claim_jobs,
--    finish_job_results and so finish_jobs, release_jobs, requeue_expired) do,
--    from the rows their UPDATE returns, in one list per statement as before.
--    Every other update (clients' cancellations, ad-hoc SQL) goes through
--    jobs_before_update, which now collects the entries of the state changes
--    it lets through in the transaction-local setting dspark.job_changes
--    (sending a full payload of about 7000 bytes when the next entry would
--    not fit); the statement trigger jobs_after_update_notify, whose WHEN
--    clause skips it unless entries are waiting, sends the rest when the
--    statement ends. So notifications stay one list per statement, never one
--    per row.
-- 3. jobs_finished_idx is gone: it served only dspark.prune, and every
--    write-back paid an entry in it. dspark.prune walks the jobs in id order.
-- 4. dspark.notify_job_changes sends a list that fits one payload without
--    cutting it, and cuts a longer one into runs of equal entry counts.

-- 4. One payload when it fits -------------------------------------------------------

CREATE OR REPLACE FUNCTION dspark.notify_job_changes(p_entries text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    k int;
BEGIN
    IF p_entries IS NULL OR pg_catalog.cardinality(p_entries) = 0 THEN
        RETURN;
    END IF;
    -- (an entry and its comma take at least 8 bytes)
    IF pg_catalog.cardinality(p_entries) <= 7000 / 8 THEN
        payload := pg_catalog.array_to_string(p_entries, ',');
        IF pg_catalog.octet_length(payload) <= 7000 THEN
            PERFORM pg_catalog.pg_notify('dspark_events', payload);
            RETURN;
        END IF;
    END IF;
    -- runs of k entries, k such that k of the longest entry fit in 7000 bytes
    SELECT 7000 / (pg_catalog.max(pg_catalog.octet_length(e.entry)) + 1) INTO k
    FROM pg_catalog.unnest(p_entries) AS e(entry);
    k := greatest(k, 1);
    FOR i IN 1 .. pg_catalog.cardinality(p_entries) BY k LOOP
        PERFORM pg_catalog.pg_notify('dspark_events',
                                     pg_catalog.array_to_string(p_entries[i:i + k - 1], ','));
    END LOOP;
END
$$;

-- The entry of one change: "id:version:state:attempt".
CREATE FUNCTION dspark.job_change(p_id bigint, p_version bigint, p_state text, p_attempt int)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_id::text || ':' || p_version::text || ':' || pg_catalog.left(p_state, 1)
           || ':' || p_attempt::text
$$;
GRANT EXECUTE ON FUNCTION dspark.job_change(bigint, bigint, text, int)
    TO dspark_client, dspark_worker, dspark_admin;

-- 1. Batches: a BRIN index, and custom_id unique within a batch ----------------------

DROP INDEX dspark.jobs_batch_custom_id_key;
CREATE INDEX jobs_batch_brin ON dspark.jobs USING brin (batch_id)
    WITH (pages_per_range = 16, autosummarize = on);

ALTER TABLE dspark.batches ADD COLUMN jobs_added bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN dspark.batches.jobs_added IS 'jobs ever added to the batch (kept by the triggers of dspark.jobs)';
UPDATE dspark.batches b SET jobs_added = (SELECT count(*) FROM dspark.jobs j WHERE j.batch_id = b.id);

-- p_added[i] jobs joined batch p_ids[i] (ids distinct): lock the batches FOR
-- NO KEY UPDATE (a concurrent delete waits, and so does a concurrent insert
-- into the same batch, which then sees these jobs), fail as the foreign key
-- did when one does not exist, count the jobs, and fail as the unique index
-- did when a custom_id repeats within a batch that had jobs before. (The
-- caller checks its new rows among themselves.) Runs with its owner's
-- rights, as foreign key checks do.
CREATE FUNCTION dspark.join_batches(p_ids bigint[], p_added bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
    missing bigint;
    b bigint;
    dup text;
    had_jobs bigint[];
BEGIN
    SELECT count(*) INTO n
    FROM (SELECT bt.id FROM dspark.batches bt WHERE bt.id = ANY (p_ids)
          ORDER BY bt.id FOR NO KEY UPDATE) l;
    IF n < cardinality(p_ids) THEN
        SELECT min(u.id) INTO missing
        FROM unnest(p_ids) AS u(id)
        WHERE NOT EXISTS (SELECT FROM dspark.batches bt WHERE bt.id = u.id);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'insert or update on table "jobs" violates foreign key constraint "jobs_batch_id_fkey"'
                USING ERRCODE = 'foreign_key_violation',
                      DETAIL = format('Key (batch_id)=(%s) is not present in table "batches".', missing),
                      SCHEMA = 'dspark', TABLE = 'jobs', CONSTRAINT = 'jobs_batch_id_fkey';
        END IF;
    END IF;
    WITH counted AS (
        UPDATE dspark.batches bt SET jobs_added = bt.jobs_added + u.added
        FROM unnest(p_ids, p_added) AS u(id, added)
        WHERE bt.id = u.id
        RETURNING bt.id, bt.jobs_added - u.added AS before
    )
    SELECT coalesce(array_agg(c.id), '{}') INTO had_jobs FROM counted c WHERE c.before > 0;
    FOREACH b IN ARRAY had_jobs LOOP
        SELECT c.custom_id INTO dup
        FROM dspark.jobs c
        WHERE c.batch_id = b AND c.custom_id IS NOT NULL
        GROUP BY c.custom_id
        HAVING count(*) > 1
        LIMIT 1;
        IF dup IS NOT NULL THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "jobs_batch_custom_id_key"'
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('Key (batch_id, custom_id)=(%s, %s) already exists.', b, dup),
                      SCHEMA = 'dspark', TABLE = 'jobs', CONSTRAINT = 'jobs_batch_custom_id_key';
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION dspark.join_batches IS 'the batch reference and custom_id checks of dspark.jobs (called by its triggers)';
REVOKE EXECUTE ON FUNCTION dspark.join_batches(bigint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.join_batches(bigint[], bigint[])
    TO dspark_client, dspark_worker, dspark_admin;

DROP FUNCTION dspark.lock_batches(bigint[]);

-- Inserts: check the batches, then notify the new jobs.
CREATE OR REPLACE FUNCTION dspark.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bids bigint[];
    counts bigint[];
    dup record;
BEGIN
    SELECT pg_catalog.array_agg(b.batch_id ORDER BY b.batch_id),
           pg_catalog.array_agg(b.n ORDER BY b.batch_id)
    INTO bids, counts
    FROM (SELECT n.batch_id, pg_catalog.count(*) AS n FROM new_rows n
          WHERE n.batch_id IS NOT NULL GROUP BY n.batch_id) b;
    IF bids IS NOT NULL THEN
        PERFORM dspark.join_batches(bids, counts);
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

-- Updates that move a job to another batch or change its custom_id (ad-hoc
-- SQL only: no queue function sets these columns).
CREATE FUNCTION dspark.jobs_after_batch_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.batch_id IS NOT NULL THEN
        PERFORM dspark.join_batches(ARRAY[NEW.batch_id], ARRAY[1]::bigint[]);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_after_batch_change AFTER UPDATE OF batch_id, custom_id ON dspark.jobs
    FOR EACH ROW
    WHEN (NEW.batch_id IS DISTINCT FROM OLD.batch_id OR NEW.custom_id IS DISTINCT FROM OLD.custom_id)
    EXECUTE FUNCTION dspark.jobs_after_batch_change();

-- 2. Notifications without the statement trigger -------------------------------------

DROP TRIGGER jobs_after_update ON dspark.jobs;
DROP FUNCTION dspark.jobs_after_update();

-- As in 001, plus the entry of the state change it lets through.
CREATE OR REPLACE FUNCTION dspark.jobs_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    entry text;
    waiting text;
BEGIN
    IF OLD.cancel_requested AND NOT NEW.cancel_requested THEN
        RAISE EXCEPTION 'cancellation of job % cannot be withdrawn', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    -- a client cancels by setting cancel_requested: a queued job ends at once,
    -- a running one when its worker notices (dspark.heartbeat)
    IF NEW.cancel_requested AND NOT OLD.cancel_requested AND OLD.state = 'queued'
       AND NEW.state = 'queued' THEN
        NEW.state := 'cancelled';
        NEW.finished_at := pg_catalog.now();
        NEW.finish_reason := 'cancelled';
    END IF;
    IF NEW.state IS DISTINCT FROM OLD.state AND NOT (
           (OLD.state = 'queued' AND NEW.state IN ('running', 'cancelled', 'failed'))
        OR (OLD.state = 'running' AND NEW.state IN ('queued', 'succeeded', 'failed', 'cancelled'))) THEN
        RAISE EXCEPTION 'job % cannot go from ''%'' to ''%''', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.version := OLD.version + 1;
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        -- collect the entry; jobs_after_update_notify sends the list
        entry := dspark.job_change(NEW.id, NEW.version, NEW.state, NEW.attempt);
        waiting := pg_catalog.current_setting('dspark.job_changes', true);
        IF waiting IS NULL OR waiting = '' THEN
            waiting := entry;
        ELSIF pg_catalog.octet_length(waiting) + 1 + pg_catalog.octet_length(entry) > 7000 THEN
            PERFORM pg_catalog.pg_notify('dspark_events', waiting);
            waiting := entry;
        ELSE
            waiting := waiting || ',' || entry;
        END IF;
        PERFORM pg_catalog.set_config('dspark.job_changes', waiting, true);
    END IF;
    RETURN NEW;
END
$$;

-- The end of an update statement: send the entries jobs_before_update collected.
CREATE FUNCTION dspark.jobs_after_update_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('dspark_events', pg_catalog.current_setting('dspark.job_changes'));
    PERFORM pg_catalog.set_config('dspark.job_changes', '', true);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_after_update_notify AFTER UPDATE ON dspark.jobs
    FOR EACH STATEMENT
    WHEN (pg_catalog.current_setting('dspark.job_changes', true) <> '')
    EXECUTE FUNCTION dspark.jobs_after_update_notify();

CREATE OR REPLACE FUNCTION dspark.claim_jobs(
    p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- lock the candidates (the locks last until the caller commits), admit
    -- a prefix within the budget, update them in the same statement (the
    -- ids as an array, so that the update finds them by primary key), and
    -- notify them
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
        ), sent AS (
            SELECT dspark.notify_job_changes(ARRAY(
                SELECT dspark.job_change(n.id, n.version, n.state, n.attempt)
                FROM claimed n ORDER BY n.id))
        )
        SELECT cl.* FROM claimed cl WHERE (SELECT count(*) FROM sent) = 1
        ORDER BY cl.priority DESC, cl.id;
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
        ), sent AS (
            SELECT dspark.notify_job_changes(ARRAY(
                SELECT dspark.job_change(n.id, n.version, n.state, n.attempt)
                FROM claimed n ORDER BY n.id))
        )
        SELECT cl.* FROM claimed cl WHERE (SELECT count(*) FROM sent) = 1
        ORDER BY cl.priority DESC, cl.id;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION dspark.finish_job_results(p_worker_id text, p_results dspark.job_result[])
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
        RETURNING j.id, j.attempt, j.version, j.state, j.owner, j.created_at, j.run_after,
                  j.started_at, j.finished_at, j.finish_reason, r.device, r.model, r.draft,
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
    ), sent AS (
        SELECT dspark.notify_job_changes(ARRAY(
            SELECT dspark.job_change(d.id, d.version, d.state, d.attempt)
            FROM done d ORDER BY d.id))
    )
    SELECT r.id, d.id IS NOT NULL
    FROM r LEFT JOIN done d ON d.id = r.id
    WHERE (SELECT count(*) FROM sent) = 1
    ORDER BY r.id;
END
$$;

CREATE OR REPLACE FUNCTION dspark.release_jobs(p_worker_id text, p_job_ids bigint[], p_attempts int[])
RETURNS SETOF bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH released AS (
        UPDATE dspark.jobs j
        SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'queued' END,
            finished_at = CASE WHEN j.cancel_requested THEN now() END,
            finish_reason = CASE WHEN j.cancel_requested THEN 'cancelled' END,
            lease_expires_at = NULL, worker_id = NULL, version = j.version + 1
        FROM unnest(p_job_ids, p_attempts) AS u(id, attempt)
        WHERE j.id = u.id AND j.attempt = u.attempt AND j.state = 'running'
          AND j.worker_id = p_worker_id
        RETURNING j.id, j.version, j.state, j.attempt
    ), sent AS (
        SELECT dspark.notify_job_changes(ARRAY(
            SELECT dspark.job_change(r.id, r.version, r.state, r.attempt)
            FROM released r ORDER BY r.id))
    )
    SELECT r.id FROM released r WHERE (SELECT count(*) FROM sent) = 1;
$$;

CREATE OR REPLACE FUNCTION dspark.requeue_expired(p_worker_timeout interval DEFAULT '1 minute')
RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
    changes text[];
BEGIN
    IF NOT pg_try_advisory_xact_lock(7234107125306835201) THEN
        RETURN NULL;
    END IF;
    WITH requeued AS (
        UPDATE dspark.jobs j
        SET state = CASE WHEN j.cancel_requested THEN 'cancelled'
                         WHEN j.attempt >= j.max_attempts THEN 'failed'
                         ELSE 'queued' END,
            error = CASE WHEN NOT j.cancel_requested AND j.attempt >= j.max_attempts
                         THEN format('lease expired after %s attempts', j.attempt)
                         ELSE j.error END,
            finish_reason = CASE WHEN j.cancel_requested THEN 'cancelled'
                                 WHEN j.attempt >= j.max_attempts THEN 'error' END,
            finished_at = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts
                               THEN now() END,
            worker_id = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts
                             THEN j.worker_id END,
            lease_expires_at = NULL, version = j.version + 1
        WHERE j.state = 'running' AND j.lease_expires_at < now()
        RETURNING j.id, j.version, j.state, j.attempt
    )
    SELECT count(*)::int, array_agg(dspark.job_change(q.id, q.version, q.state, q.attempt) ORDER BY q.id)
    INTO n, changes
    FROM requeued q;
    PERFORM dspark.notify_job_changes(changes);
    UPDATE dspark.workers
    SET state = 'lost'
    WHERE state IN ('starting', 'running', 'draining')
      AND heartbeat_at < now() - p_worker_timeout;
    RETURN n;
END
$$;

-- 3. Retention without jobs_finished_idx -------------------------------------------

DROP INDEX dspark.jobs_finished_idx;

CREATE OR REPLACE FUNCTION dspark.prune(p_older_than interval, p_limit int DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'prune: interval must be zero or positive, got %', p_older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- oldest ids first (their statistics go by the jobs' delete trigger)
    DELETE FROM dspark.jobs
    WHERE id IN (SELECT j.id FROM dspark.jobs j
                 WHERE j.finished_at < now() - p_older_than
                   AND j.state IN ('succeeded', 'failed', 'cancelled')
                 ORDER BY j.id
                 LIMIT p_limit);
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM dspark.batches b
    WHERE b.created_at < now() - p_older_than
      AND NOT EXISTS (SELECT FROM dspark.jobs j WHERE j.batch_id = b.id);
    DELETE FROM dspark.workers
    WHERE state IN ('stopped', 'lost') AND heartbeat_at < now() - p_older_than;
    RETURN n;
END
$$;

INSERT INTO dspark.schema_version (version, name) VALUES (4, '004-index-churn');
