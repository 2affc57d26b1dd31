-- 018-heartbeat-watermark.sql: a heartbeat ends only the leases of claims
-- older than what its worker had heard when it sent it.
--
-- 017 let a heartbeat requeue the running jobs of its worker id that it does
-- not name, claimed since the worker's process registered. But a heartbeat
-- can itself run late: sent on a connection whose server process (or pooler)
-- stopped answering, it runs once that process resumes, after the worker gave
-- the connection up and claimed more on a new one. It then named only the jobs
-- of before, and requeued (or failed, their attempts spent) jobs the worker was
-- running.
--
-- Now the caller says how far its books go: p_heard_until, a server time taken
-- from a statement whose answer the worker had read before it built the list
-- of held jobs (the worker sends its last heartbeat's now()). Any claim that the
-- worker reads after building the list started after that answer came, so its
-- started_at is later than p_heard_until, and only jobs claimed at or before it
-- can be strays. A job claimed unheard after the watermark waits for a later
-- heartbeat (the next one's watermark passes it), or its lease. Without
-- p_heard_until (an older worker), no stray is requeued: 017's check is off,
-- and such jobs wait for their leases as before 017.
--
-- A process whose worker id another process took over (it was cut off for
-- longer than a lease) went on claiming under that id until its next
-- heartbeat told it so; the new holder's heartbeats then requeued those claims
-- as strays, their attempts counted, while the old process ran them.
-- dspark.claim_jobs_held claims only for the process that holds the worker row
-- (by instance), and refuses anyone else with SQLSTATE 55006, as the heartbeat
-- does, so the old process stops at its first claim. It reads the row without
-- locking it: a lock held by a claim whose server process stalls would hold up
-- the worker's heartbeats on its next connection, and the lease reaper's pass
-- for every worker (it marks the row lost in the same transaction). A takeover
-- that commits while a claim runs can still let that one claim through; the
-- new holder's heartbeats requeue it, as they would any stray.

-- Why a caller that does not hold worker p_worker_id's row may not act for it:
-- 55006 naming the process that holds it, or P0002 when there is no row and
-- p_row_required (a caller with an instance). Returns when neither applies.
CREATE FUNCTION dspark.refuse_worker_row(p_worker_id text, p_row_required boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_w record;
BEGIN
    SELECT w.host, w.pid, w.instance INTO v_w FROM dspark.workers w WHERE w.worker_id = p_worker_id;
    IF FOUND AND v_w.instance IS NOT NULL THEN
        RAISE EXCEPTION 'worker id % was taken over by host % (pid %, instance %) while this worker''s heartbeat was older than a lease',
            quote_literal(p_worker_id), quote_literal(v_w.host), v_w.pid, quote_literal(v_w.instance)
            USING ERRCODE = 'object_in_use', HINT = 'give each worker its own worker id';
    ELSIF FOUND THEN
        RAISE EXCEPTION 'worker id % was taken over by host % (pid %) while this worker''s heartbeat was older than a lease',
            quote_literal(p_worker_id), quote_literal(v_w.host), v_w.pid
            USING ERRCODE = 'object_in_use', HINT = 'give each worker its own worker id';
    ELSIF p_row_required THEN
        RAISE EXCEPTION 'worker id % has no row in dspark.workers (removed while this worker''s heartbeat was old)',
            quote_literal(p_worker_id)
            USING ERRCODE = 'no_data_found', HINT = 'register the worker again';
    END IF;
END
$$;
COMMENT ON FUNCTION dspark.refuse_worker_row IS 'raises why a caller that does not hold a worker row may not act for it: 55006 naming the holder, or P0002 when there is no row and one is required';
REVOKE EXECUTE ON FUNCTION dspark.refuse_worker_row(text, boolean) FROM PUBLIC;

DROP FUNCTION dspark.heartbeat(text, bigint[], int[], int, text, int, text);

CREATE FUNCTION dspark.heartbeat(
    p_worker_id text, p_job_ids bigint[], p_attempts int[], p_lease_seconds int,
    p_host text DEFAULT NULL, p_pid int DEFAULT NULL, p_instance text DEFAULT NULL,
    p_heard_until timestamptz DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_registered timestamptz;
    v_changes text[];
BEGIN
    UPDATE dspark.workers w
    SET heartbeat_at = now(),
        state = CASE WHEN state IN ('lost', 'starting') THEN 'running' ELSE state END
    WHERE worker_id = p_worker_id AND dspark.holds_worker_row(p_host, p_pid, p_instance, w.host, w.pid, w.instance)
    RETURNING w.started_at INTO v_registered;
    IF NOT FOUND AND (p_host IS NOT NULL OR p_instance IS NOT NULL) THEN
        PERFORM dspark.refuse_worker_row(p_worker_id, p_instance IS NOT NULL);
    END IF;
    IF p_instance IS NOT NULL AND v_registered IS NOT NULL AND p_heard_until IS NOT NULL THEN
        -- the strays: running under this worker id, claimed by this process before the caller's
        -- watermark, not named
        WITH strays AS (
            UPDATE dspark.jobs j
            SET state = CASE WHEN j.cancel_requested THEN 'cancelled'
                             WHEN j.attempt - j.released >= j.max_attempts THEN 'failed'
                             ELSE 'queued' END,
                error = CASE WHEN NOT j.cancel_requested AND j.attempt - j.released >= j.max_attempts
                             THEN format('not held by worker %s, which had it running (a claim it did not hear of, '
                                         'or a result it could not store), after %s attempts',
                                         quote_literal(p_worker_id), j.attempt - j.released)
                             ELSE j.error END,
                finish_reason = CASE WHEN j.cancel_requested THEN 'cancelled'
                                     WHEN j.attempt - j.released >= j.max_attempts THEN 'error' END,
                finished_at = CASE WHEN j.cancel_requested OR j.attempt - j.released >= j.max_attempts
                                   THEN now() END,
                worker_id = CASE WHEN j.cancel_requested OR j.attempt - j.released >= j.max_attempts
                                 THEN j.worker_id END,
                lease_expires_at = NULL, version = j.version + 1
            WHERE j.state = 'running' AND j.worker_id = p_worker_id AND j.started_at >= v_registered
              AND j.started_at <= p_heard_until
              AND NOT EXISTS (SELECT FROM unnest(p_job_ids, p_attempts) AS u(id, attempt)
                              WHERE u.id = j.id AND u.attempt = j.attempt)
            RETURNING j.id, j.version, j.state, j.attempt
        )
        SELECT array_agg(dspark.job_change(s.id, s.version, s.state, s.attempt) ORDER BY s.id)
        INTO v_changes
        FROM strays s;
        PERFORM dspark.notify_job_changes(v_changes);
    END IF;
    RETURN QUERY
    WITH extended AS (
        UPDATE dspark.jobs j
        SET lease_expires_at = now() + make_interval(secs => greatest(p_lease_seconds, 1)),
            version = j.version + 1
        FROM unnest(p_job_ids, p_attempts) AS u(id, attempt)
        WHERE j.id = u.id AND j.attempt = u.attempt AND j.state = 'running'
          AND j.worker_id = p_worker_id
        RETURNING j.id, j.cancel_requested
    )
    SELECT u.id
    FROM unnest(p_job_ids) AS u(id)
    LEFT JOIN extended e ON e.id = u.id
    WHERE e.id IS NULL OR e.cancel_requested
    ORDER BY u.id;
END
$$;
COMMENT ON FUNCTION dspark.heartbeat IS 'extend leases; returns the ids to stop (cancelled or no longer held); with an instance (else host and pid), refuses (55006) a worker whose id another process took over, and (P0002) one whose row is gone; with an instance and p_heard_until, ends the lease of each running job of the worker id that it does not name, claimed since the process registered and at or before p_heard_until (requeued, the attempt counted)';

REVOKE EXECUTE ON FUNCTION dspark.heartbeat(text, bigint[], int[], int, text, int, text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.heartbeat(text, bigint[], int[], int, text, int, text, timestamptz)
TO dspark_worker, dspark_admin;

CREATE FUNCTION dspark.claim_jobs_held(
    p_instance text, p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL, p_job_tokens int DEFAULT 0)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM dspark.workers w
                   WHERE w.worker_id = p_worker_id AND w.instance IS NOT DISTINCT FROM p_instance) THEN
        PERFORM dspark.refuse_worker_row(p_worker_id, true);
    END IF;
    RETURN QUERY SELECT * FROM dspark.claim_jobs(p_worker_id, p_max_jobs, p_token_budget, p_lease_seconds, p_models,
                                                  p_job_tokens);
END
$$;
COMMENT ON FUNCTION dspark.claim_jobs_held IS 'dspark.claim_jobs for the worker process that holds the worker row (by instance): refuses (55006) one whose id another process took over, and (P0002) one whose row is gone';
REVOKE EXECUTE ON FUNCTION dspark.claim_jobs_held(text, text, int, bigint, int, text[], int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.claim_jobs_held(text, text, int, bigint, int, text[], int)
TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (18, '018-heartbeat-watermark');
