-- 021-unserved-waited.sql: the unknown-model sweep fails only jobs that have
-- waited its timeout, and none of a model that a worker serves by then.
--
-- dspark-worker's sweep picks models whose jobs have all been queued longer
-- than --unknown-model-timeout with no worker serving them, then claimed them
-- with claim_unserved, which took every due job of the model: one submitted a
-- second before, or a delayed one whose run_after had just passed, failed with
-- the others, long before its own timeout. And a worker for the model that
-- registered between the sweep's look and its claim did not save them.
--
-- claim_unserved takes p_waited_seconds: given, it claims only jobs queued
-- (and due) for at least that long, and nothing while a worker serves the
-- model (starting, running or draining, or heard from in the last ten minutes:
-- the sweep's own test). Left out (NULL), it claims as before, for ad-hoc SQL.
-- claim_unserved_held passes it on; a schema-20 worker's five arguments still
-- call it, with the old meaning.

DROP FUNCTION dspark.claim_unserved_held(text, text, text, int, int);
DROP FUNCTION dspark.claim_unserved(text, text, int, int);

CREATE FUNCTION dspark.claim_unserved(p_worker_id text, p_model text, p_max_jobs int, p_lease_seconds int,
                                      p_waited_seconds float8 DEFAULT NULL)
RETURNS SETOF dspark.jobs
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT dspark.promote_due_jobs(p_model, 1000);
    WITH claimed AS (
        UPDATE dspark.jobs j
        SET state = 'running', attempt = j.attempt + 1, worker_id = p_worker_id,
            version = j.version + 1, started_at = now(),
            lease_expires_at = now() + make_interval(secs => greatest(p_lease_seconds, 1))
        WHERE j.id = ANY (ARRAY(
            SELECT c.id
            FROM dspark.jobs c
            WHERE c.state = 'queued' AND NOT c.delayed AND c.run_after <= now() AND c.model = p_model
              AND (c.expires_at IS NULL OR c.expires_at > now())
              AND (p_waited_seconds IS NULL
                   OR greatest(c.created_at, c.run_after) < now() - make_interval(secs => p_waited_seconds))
              AND (p_waited_seconds IS NULL
                   OR NOT EXISTS (SELECT FROM dspark.workers w WHERE w.model = p_model
                                  AND (w.state IN ('starting', 'running', 'draining')
                                       OR w.heartbeat_at > now() - interval '10 minutes')))
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
$$;
COMMENT ON FUNCTION dspark.claim_unserved IS 'claim queued jobs of a model no worker serves, to fail them (the unknown-model sweep); with p_waited_seconds, only jobs queued and due at least that long, and none while a worker serves the model';

CREATE FUNCTION dspark.claim_unserved_held(p_instance text, p_worker_id text, p_model text, p_max_jobs int,
                                           p_lease_seconds int, p_waited_seconds float8 DEFAULT NULL)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dspark.require_worker_row(p_instance, p_worker_id);
    RETURN QUERY SELECT * FROM dspark.claim_unserved(p_worker_id, p_model, p_max_jobs, p_lease_seconds,
                                                      p_waited_seconds);
END
$$;
COMMENT ON FUNCTION dspark.claim_unserved_held IS 'dspark.claim_unserved (the unknown-model sweep) for the worker process that holds the worker row (by instance): refuses (55006) one whose id another process took over, and (P0002) one whose row is gone';

REVOKE EXECUTE ON FUNCTION
    dspark.claim_unserved(text, text, int, int, float8),
    dspark.claim_unserved_held(text, text, text, int, int, float8)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    dspark.claim_unserved(text, text, int, int, float8),
    dspark.claim_unserved_held(text, text, text, int, int, float8)
TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (21, '021-unserved-waited');
