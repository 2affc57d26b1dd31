-- 010-worker-instance.sql: a worker process is known by a token of its own.
--
-- 009 fenced a worker id by the holder's host and pid. Two processes can show
-- the same pair: containers that share the host's name (host networking) and
-- start their processes in the same order, or a container restarted with the
-- same pid. Each worker process now draws a random instance token at start
-- and gives it to worker_starting, register_worker, heartbeat and
-- set_worker_state; where it is given, it decides which process holds the row
-- (host and pid still decide for callers that give none, as in 009).
--
-- A worker's row may also be gone while the worker runs: dspark.prune deletes
-- rows of lost workers, and a worker cut off from the database for longer
-- than the retention sees its row removed. A heartbeat with an instance for a
-- row that is not there is refused (SQLSTATE P0002, no_data_found) before it
-- extends any lease, so that the worker registers again instead of
-- heartbeating into nothing.

ALTER TABLE dspark.workers ADD COLUMN instance text;
COMMENT ON COLUMN dspark.workers.instance IS 'random token the worker process drew at start: which process holds this worker id';

-- dsparkctl workers --json shows it (a new last column: the view's others stay as they were)
CREATE OR REPLACE VIEW dspark.worker_status AS
SELECT w.worker_id, w.host, w.pid, w.device, w.model, w.draft, w.model_checksum,
       w.draft_checksum, w.state, w.started_at, w.heartbeat_at,
       extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age_s,
       (SELECT count(*) FROM dspark.jobs j
        WHERE j.state = 'running' AND j.worker_id = w.worker_id) AS running_jobs,
       w.instance
FROM dspark.workers w;

-- Whether the caller (host, pid, instance; any of them NULL) holds a row with
-- these values: by instance where the caller gives one, else by host and pid,
-- else (neither given: plain SQL) always.
CREATE FUNCTION dspark.holds_worker_row(
    p_host text, p_pid int, p_instance text, w_host text, w_pid int, w_instance text)
RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN p_instance IS NOT NULL THEN w_instance IS NOT DISTINCT FROM p_instance
                WHEN p_host IS NOT NULL THEN w_host IS NOT DISTINCT FROM p_host AND w_pid IS NOT DISTINCT FROM p_pid
                ELSE true END;
$$;
COMMENT ON FUNCTION dspark.holds_worker_row IS 'whether a caller (host, pid, instance) holds a worker row: by instance when given, else by host and pid';

DROP FUNCTION dspark.worker_starting(text, text, int, text, text, float8);
CREATE FUNCTION dspark.worker_starting(
    p_worker_id text, p_host text, p_pid int, p_device text, p_model text,
    p_live_s float8 DEFAULT 30, p_instance text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_old record;
    v_new_process boolean;
BEGIN
    PERFORM dspark.take_worker_id(p_worker_id, p_host, p_live_s);
    SELECT pid, host, instance INTO v_old FROM dspark.workers WHERE worker_id = p_worker_id;
    v_new_process := NOT FOUND OR v_old.pid IS DISTINCT FROM p_pid OR v_old.host IS DISTINCT FROM p_host
                     OR (p_instance IS NOT NULL AND v_old.instance IS DISTINCT FROM p_instance);
    INSERT INTO dspark.workers AS w (worker_id, host, pid, instance, device, model, started_at, heartbeat_at, state)
    VALUES (p_worker_id, p_host, p_pid, p_instance, p_device, p_model, now(), now(), 'starting')
    ON CONFLICT (worker_id) DO UPDATE
    SET host = EXCLUDED.host, device = EXCLUDED.device, model = EXCLUDED.model,
        heartbeat_at = now(), state = 'starting',
        started_at = CASE WHEN v_new_process THEN now() ELSE w.started_at END,
        draft = CASE WHEN v_new_process THEN NULL ELSE w.draft END,
        model_checksum = CASE WHEN v_new_process THEN NULL ELSE w.model_checksum END,
        draft_checksum = CASE WHEN v_new_process THEN NULL ELSE w.draft_checksum END,
        sps_profile = CASE WHEN v_new_process THEN NULL ELSE w.sps_profile END,
        pid = EXCLUDED.pid,
        -- a caller without a token that is the same process (host and pid) keeps the row's
        instance = CASE WHEN p_instance IS NULL AND NOT v_new_process THEN w.instance ELSE EXCLUDED.instance END;
    -- a new process under this id: the leases of the one before end now
    IF v_new_process THEN
        UPDATE dspark.jobs j
        SET lease_expires_at = now(), version = j.version + 1
        WHERE j.state = 'running' AND j.worker_id = p_worker_id;
    END IF;
END
$$;
COMMENT ON FUNCTION dspark.worker_starting IS 'a worker announces itself before loading its model (state starting); repeated as its heartbeat while it loads; refuses an id a live worker on another host holds (55006)';

DROP FUNCTION dspark.register_worker(text, text, int, text, text, text, text, text, jsonb, float8);
CREATE FUNCTION dspark.register_worker(
    p_worker_id text, p_host text, p_pid int, p_device text, p_model text,
    p_draft text, p_model_checksum text, p_draft_checksum text,
    p_sps_profile jsonb DEFAULT NULL, p_live_s float8 DEFAULT 30, p_instance text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dspark.take_worker_id(p_worker_id, p_host, p_live_s);
    INSERT INTO dspark.workers AS w (worker_id, host, pid, instance, device, model, draft,
                                     model_checksum, draft_checksum, sps_profile,
                                     started_at, heartbeat_at, state)
    VALUES (p_worker_id, p_host, p_pid, p_instance, p_device, p_model, p_draft,
            p_model_checksum, p_draft_checksum, p_sps_profile, now(), now(), 'running')
    ON CONFLICT (worker_id) DO UPDATE
    SET host = EXCLUDED.host, pid = EXCLUDED.pid,
        instance = CASE WHEN p_instance IS NULL AND w.host IS NOT DISTINCT FROM EXCLUDED.host
                             AND w.pid IS NOT DISTINCT FROM EXCLUDED.pid
                        THEN w.instance ELSE EXCLUDED.instance END,
        device = EXCLUDED.device,
        model = EXCLUDED.model, draft = EXCLUDED.draft,
        model_checksum = EXCLUDED.model_checksum, draft_checksum = EXCLUDED.draft_checksum,
        sps_profile = EXCLUDED.sps_profile, started_at = now(), heartbeat_at = now(),
        state = 'running';
END
$$;
COMMENT ON FUNCTION dspark.register_worker IS 'a worker announces itself (upsert by worker_id), state running; refuses an id a live worker on another host holds (55006)';

DROP FUNCTION dspark.heartbeat(text, bigint[], int[], int, text, int);
CREATE FUNCTION dspark.heartbeat(
    p_worker_id text, p_job_ids bigint[], p_attempts int[], p_lease_seconds int,
    p_host text DEFAULT NULL, p_pid int DEFAULT NULL, p_instance text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_w record;
BEGIN
    UPDATE dspark.workers w
    SET heartbeat_at = now(),
        state = CASE WHEN state IN ('lost', 'starting') THEN 'running' ELSE state END
    WHERE worker_id = p_worker_id AND dspark.holds_worker_row(p_host, p_pid, p_instance, w.host, w.pid, w.instance);
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
COMMENT ON FUNCTION dspark.heartbeat IS 'extend leases; returns the ids to stop (cancelled or no longer held); with an instance (else host and pid), refuses (55006) a worker whose id another process took over, and (P0002) one whose row is gone';

DROP FUNCTION dspark.set_worker_state(text, text, text, int);
CREATE FUNCTION dspark.set_worker_state(
    p_worker_id text, p_state text, p_host text DEFAULT NULL, p_pid int DEFAULT NULL,
    p_instance text DEFAULT NULL)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dspark.workers w SET state = p_state, heartbeat_at = now()
    WHERE worker_id = p_worker_id AND dspark.holds_worker_row(p_host, p_pid, p_instance, w.host, w.pid, w.instance);
$$;
COMMENT ON FUNCTION dspark.set_worker_state IS 'starting, running, draining, stopped; with an instance (else host and pid), only while the caller holds the row';

REVOKE EXECUTE ON FUNCTION
    dspark.holds_worker_row(text, int, text, text, int, text),
    dspark.worker_starting(text, text, int, text, text, float8, text),
    dspark.register_worker(text, text, int, text, text, text, text, text, jsonb, float8, text),
    dspark.heartbeat(text, bigint[], int[], int, text, int, text),
    dspark.set_worker_state(text, text, text, int, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    dspark.holds_worker_row(text, int, text, text, int, text),
    dspark.worker_starting(text, text, int, text, text, float8, text),
    dspark.register_worker(text, text, int, text, text, text, text, text, jsonb, float8, text),
    dspark.heartbeat(text, bigint[], int[], int, text, int, text),
    dspark.set_worker_state(text, text, text, int, text)
TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (10, '010-worker-instance');
