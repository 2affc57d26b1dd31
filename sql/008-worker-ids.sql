-- 008-worker-ids.sql: one live worker per worker id.
--
-- Two hosts configured with the same worker id used to take turns at one
-- dspark.workers row, and each new start ended the other's leases. Now
-- worker_starting and register_worker refuse a worker id that a live worker
-- on another host holds: its row is in state starting, running or draining
-- and its heartbeat is younger than p_live_s seconds (the caller's lease). The
-- refusal is SQLSTATE 55006 (object_in_use) and names the host. A process on
-- the same host takes the id over (dsparkd restarts its workers under their
-- ids), and so does any process once the holder's heartbeat is old. The check
-- and the upsert are one step: take_worker_id holds a transaction-scoped lock
-- on the id, so a second caller waits for the first to commit and then sees
-- its row.

CREATE FUNCTION dspark.take_worker_id(p_worker_id text, p_host text, p_live_s float8)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_held text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('dspark.worker_id'), hashtext(p_worker_id));
    SELECT format('worker id %L is in use on host %L (pid %s, %s, heartbeat %s s ago)',
                  w.worker_id, w.host, w.pid, w.state,
                  round(extract(epoch FROM now() - w.heartbeat_at)::numeric, 1))
    INTO v_held
    FROM dspark.workers w
    WHERE w.worker_id = p_worker_id AND w.host IS DISTINCT FROM p_host
      AND w.state IN ('starting', 'running', 'draining')
      AND w.heartbeat_at > now() - make_interval(secs => greatest(p_live_s, 0));
    IF v_held IS NOT NULL THEN
        RAISE EXCEPTION '%', v_held USING ERRCODE = 'object_in_use',
            HINT = 'give each worker its own worker id';
    END IF;
END
$$;
COMMENT ON FUNCTION dspark.take_worker_id IS 'lock a worker id for this transaction; refuse it (55006) while a live worker on another host holds it';

DROP FUNCTION dspark.worker_starting(text, text, int, text, text);
CREATE FUNCTION dspark.worker_starting(
    p_worker_id text, p_host text, p_pid int, p_device text, p_model text,
    p_live_s float8 DEFAULT 30)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_old_pid int;
    v_old_host text;
BEGIN
    PERFORM dspark.take_worker_id(p_worker_id, p_host, p_live_s);
    SELECT pid, host INTO v_old_pid, v_old_host FROM dspark.workers WHERE worker_id = p_worker_id;
    INSERT INTO dspark.workers AS w (worker_id, host, pid, device, model, started_at, heartbeat_at, state)
    VALUES (p_worker_id, p_host, p_pid, p_device, p_model, now(), now(), 'starting')
    ON CONFLICT (worker_id) DO UPDATE
    SET host = EXCLUDED.host, device = EXCLUDED.device, model = EXCLUDED.model,
        heartbeat_at = now(), state = 'starting',
        started_at = CASE WHEN w.pid IS DISTINCT FROM EXCLUDED.pid THEN now() ELSE w.started_at END,
        draft = CASE WHEN w.pid IS DISTINCT FROM EXCLUDED.pid THEN NULL ELSE w.draft END,
        model_checksum = CASE WHEN w.pid IS DISTINCT FROM EXCLUDED.pid THEN NULL ELSE w.model_checksum END,
        draft_checksum = CASE WHEN w.pid IS DISTINCT FROM EXCLUDED.pid THEN NULL ELSE w.draft_checksum END,
        sps_profile = CASE WHEN w.pid IS DISTINCT FROM EXCLUDED.pid THEN NULL ELSE w.sps_profile END,
        pid = EXCLUDED.pid;
    -- a new process under this id: the leases of the one before end now
    IF v_old_pid IS DISTINCT FROM p_pid OR v_old_host IS DISTINCT FROM p_host THEN
        UPDATE dspark.jobs j
        SET lease_expires_at = now(), version = j.version + 1
        WHERE j.state = 'running' AND j.worker_id = p_worker_id;
    END IF;
END
$$;
COMMENT ON FUNCTION dspark.worker_starting IS 'a worker announces itself before loading its model (state starting); repeated as its heartbeat while it loads; refuses an id a live worker on another host holds (55006)';

DROP FUNCTION dspark.register_worker(text, text, int, text, text, text, text, text, jsonb);
CREATE FUNCTION dspark.register_worker(
    p_worker_id text, p_host text, p_pid int, p_device text, p_model text,
    p_draft text, p_model_checksum text, p_draft_checksum text,
    p_sps_profile jsonb DEFAULT NULL, p_live_s float8 DEFAULT 30)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dspark.take_worker_id(p_worker_id, p_host, p_live_s);
    INSERT INTO dspark.workers AS w (worker_id, host, pid, device, model, draft,
                                     model_checksum, draft_checksum, sps_profile,
                                     started_at, heartbeat_at, state)
    VALUES (p_worker_id, p_host, p_pid, p_device, p_model, p_draft,
            p_model_checksum, p_draft_checksum, p_sps_profile, now(), now(), 'running')
    ON CONFLICT (worker_id) DO UPDATE
    SET host = EXCLUDED.host, pid = EXCLUDED.pid, device = EXCLUDED.device,
        model = EXCLUDED.model, draft = EXCLUDED.draft,
        model_checksum = EXCLUDED.model_checksum, draft_checksum = EXCLUDED.draft_checksum,
        sps_profile = EXCLUDED.sps_profile, started_at = now(), heartbeat_at = now(),
        state = 'running';
END
$$;
COMMENT ON FUNCTION dspark.register_worker IS 'a worker announces itself (upsert by worker_id), state running; refuses an id a live worker on another host holds (55006)';

REVOKE EXECUTE ON FUNCTION
    dspark.take_worker_id(text, text, float8),
    dspark.worker_starting(text, text, int, text, text, float8),
    dspark.register_worker(text, text, int, text, text, text, text, text, jsonb, float8)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    dspark.take_worker_id(text, text, float8),
    dspark.worker_starting(text, text, int, text, text, float8),
    dspark.register_worker(text, text, int, text, text, text, text, text, jsonb, float8)
TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (8, '008-worker-ids');
