-- 020-claim-unserved-held.sql: the unknown-model sweep claims only for the
-- worker process that holds its worker row.
--
-- 018 made dspark-worker's claims go through claim_jobs_held, which refuses a
-- process whose worker id another process took over (it was cut off for longer
-- than a lease). The unknown-model sweep still claimed with claim_unserved,
-- which takes any caller's word for its worker id: such a process went on
-- claiming, under the new holder's id, the jobs of models nobody serves, and
-- failing them, until its next claim or heartbeat stopped it. The new holder's
-- heartbeats could meanwhile requeue those claims as strays, their attempts
-- counted. claim_unserved_held checks first, as claim_jobs_held does (both
-- now through require_worker_row): 55006 naming the holder, P0002 when the
-- row is gone. claim_unserved stays for older workers and ad-hoc SQL.

-- Returns when the process p_instance holds worker p_worker_id's row; else
-- raises why not (refuse_worker_row: 55006 naming the holder, P0002 when
-- there is no row). The check of both claims for the worker process.
CREATE FUNCTION dspark.require_worker_row(p_instance text, p_worker_id text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM dspark.workers w
                   WHERE w.worker_id = p_worker_id AND w.instance IS NOT DISTINCT FROM p_instance) THEN
        PERFORM dspark.refuse_worker_row(p_worker_id, true);
    END IF;
END
$$;
COMMENT ON FUNCTION dspark.require_worker_row IS 'returns when the process (instance) holds the worker row; else raises why not: 55006 naming the holder, P0002 when there is no row';
REVOKE EXECUTE ON FUNCTION dspark.require_worker_row(text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dspark.claim_jobs_held(
    p_instance text, p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL, p_job_tokens int DEFAULT 0)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dspark.require_worker_row(p_instance, p_worker_id);
    RETURN QUERY SELECT * FROM dspark.claim_jobs(p_worker_id, p_max_jobs, p_token_budget, p_lease_seconds, p_models,
                                                  p_job_tokens);
END
$$;

CREATE FUNCTION dspark.claim_unserved_held(p_instance text, p_worker_id text, p_model text, p_max_jobs int,
                                           p_lease_seconds int)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dspark.require_worker_row(p_instance, p_worker_id);
    RETURN QUERY SELECT * FROM dspark.claim_unserved(p_worker_id, p_model, p_max_jobs, p_lease_seconds);
END
$$;
COMMENT ON FUNCTION dspark.claim_unserved_held IS 'dspark.claim_unserved (the unknown-model sweep) for the worker process that holds the worker row (by instance): refuses (55006) one whose id another process took over, and (P0002) one whose row is gone';
REVOKE EXECUTE ON FUNCTION dspark.claim_unserved_held(text, text, text, int, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.claim_unserved_held(text, text, text, int, int) TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (20, '020-claim-unserved-held');
