-- 009-worker-fence.sql: a worker whose id was taken over stops.
--
-- 008 lets a process take a worker id over once its holder's heartbeat is
-- older than a lease (a crashed worker, or one cut off from the database).
-- The holder cut off may come back: its heartbeats then matched the row on
-- the id alone, kept it alive under the new process's host and pid, and it
-- went on claiming jobs under that id. Now heartbeat and set_worker_state
-- take the caller's host and pid. heartbeat refuses (SQLSTATE 55006,
-- object_in_use, naming the new holder) a caller that no longer holds the
-- row, before it extends any lease, and set_worker_state changes only the
-- caller's own row. Called without host and pid (plain SQL, older callers),
-- both behave as before.

DROP FUNCTION dspark.heartbeat(text, bigint[], int[], int);
CREATE FUNCTION dspark.heartbeat(
    p_worker_id text, p_job_ids bigint[], p_attempts int[], p_lease_seconds int,
    p_host text DEFAULT NULL, p_pid int DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_host text;
    v_pid int;
BEGIN
    UPDATE dspark.workers
    SET heartbeat_at = now(),
        state = CASE WHEN state IN ('lost', 'starting') THEN 'running' ELSE state END
    WHERE worker_id = p_worker_id
      AND (p_host IS NULL OR (host IS NOT DISTINCT FROM p_host AND pid IS NOT DISTINCT FROM p_pid));
    IF NOT FOUND AND p_host IS NOT NULL THEN
        SELECT w.host, w.pid INTO v_host, v_pid FROM dspark.workers w WHERE w.worker_id = p_worker_id;
        IF FOUND THEN
            RAISE EXCEPTION 'worker id % was taken over by host % (pid %) while this worker''s heartbeat was older than a lease',
                quote_literal(p_worker_id), quote_literal(v_host), v_pid
                USING ERRCODE = 'object_in_use', HINT = 'give each worker its own worker id';
        END IF;
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
COMMENT ON FUNCTION dspark.heartbeat IS 'extend leases; returns the ids to stop (cancelled or no longer held); with host and pid, refuses (55006) a worker whose id another process took over';

DROP FUNCTION dspark.set_worker_state(text, text);
CREATE FUNCTION dspark.set_worker_state(
    p_worker_id text, p_state text, p_host text DEFAULT NULL, p_pid int DEFAULT NULL)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dspark.workers SET state = p_state, heartbeat_at = now()
    WHERE worker_id = p_worker_id
      AND (p_host IS NULL OR (host IS NOT DISTINCT FROM p_host AND pid IS NOT DISTINCT FROM p_pid));
$$;
COMMENT ON FUNCTION dspark.set_worker_state IS 'starting, running, draining, stopped; with host and pid, only while the caller holds the row';

REVOKE EXECUTE ON FUNCTION
    dspark.heartbeat(text, bigint[], int[], int, text, int),
    dspark.set_worker_state(text, text, text, int)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    dspark.heartbeat(text, bigint[], int[], int, text, int),
    dspark.set_worker_state(text, text, text, int)
TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (9, '009-worker-fence');
