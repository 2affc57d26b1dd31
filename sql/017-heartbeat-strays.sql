-- 017-heartbeat-strays.sql: a worker's heartbeat requeues the jobs that its
-- process holds in the database but not in its own books.
--
-- A claim can commit on a connection whose answer the worker never read: a
-- server process (or a pooler) that stopped answering, so that the worker
-- gave the connection up and made another, runs the claim it had already
-- read once it resumes; or a connection breaks after the claim committed.
-- Those jobs stayed running under the worker's id, with nobody on them, until
-- their lease expired. A worker's claims and heartbeats go one after another
-- on one connection, and a heartbeat names every job whose claim the worker
-- read and whose result it has not stored, so a running job of the worker id
-- that the heartbeat does not name, claimed since the worker's process
-- registered, is such a stray (or a job whose result and failure the worker
-- could not store, which it leaves to its lease). The heartbeat now ends its
-- lease at once: the job goes back to the queue, its claim counted against
-- max_attempts (failed once they are spent, cancelled when a cancel was asked
-- for), as the lease reaper would, but not marked to run alone (its worker
-- did not crash on it). Only a heartbeat with an instance, from the process
-- that holds the worker row, does so; jobs claimed before that process
-- registered (a crashed or replaced process's) are left to their leases, as
-- before.

CREATE OR REPLACE FUNCTION dspark.heartbeat(
    p_worker_id text, p_job_ids bigint[], p_attempts int[], p_lease_seconds int,
    p_host text DEFAULT NULL, p_pid int DEFAULT NULL, p_instance text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_w record;
    v_registered timestamptz;
    v_changes text[];
BEGIN
    UPDATE dspark.workers w
    SET heartbeat_at = now(),
        state = CASE WHEN state IN ('lost', 'starting') THEN 'running' ELSE state END
    WHERE worker_id = p_worker_id AND dspark.holds_worker_row(p_host, p_pid, p_instance, w.host, w.pid, w.instance)
    RETURNING w.started_at INTO v_registered;
    IF NOT FOUND AND (p_host IS NOT NULL OR p_instance IS NOT NULL) THEN
        SELECT w.host, w.pid, w.instance INTO v_w FROM dspark.workers w WHERE w.worker_id = p_worker_id;
        IF FOUND AND v_w.instance IS NOT NULL THEN
            RAISE EXCEPTION 'worker id % was taken over by host % (pid %, instance %) while this worker''s heartbeat was older than a lease',
                quote_literal(p_worker_id), quote_literal(v_w.host), v_w.pid, quote_literal(v_w.instance)
                USING ERRCODE = 'object_in_use', HINT = 'give each worker its own worker id';
        ELSIF FOUND THEN
            RAISE EXCEPTION 'worker id % was taken over by host % (pid %) while this worker''s heartbeat was older than a lease',
                quote_literal(p_worker_id), quote_literal(v_w.host), v_w.pid
                USING ERRCODE = 'object_in_use', HINT = 'give each worker its own worker id';
        ELSIF p_instance IS NOT NULL THEN
            RAISE EXCEPTION 'worker id % has no row in dspark.workers (removed while this worker''s heartbeat was old)',
                quote_literal(p_worker_id)
                USING ERRCODE = 'no_data_found', HINT = 'register the worker again';
        END IF;
    END IF;
    IF p_instance IS NOT NULL AND v_registered IS NOT NULL THEN
        -- the strays: running under this worker id, claimed by this process, not named
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
COMMENT ON FUNCTION dspark.heartbeat IS 'extend leases; returns the ids to stop (cancelled or no longer held); with an instance (else host and pid), refuses (55006) a worker whose id another process took over, and (P0002) one whose row is gone; with an instance, ends the lease of each running job of the worker id that it does not name and that was claimed since the process registered (requeued, the attempt counted)';

INSERT INTO dspark.schema_version (version, name) VALUES (17, '017-heartbeat-strays');
