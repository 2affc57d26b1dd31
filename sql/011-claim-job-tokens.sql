-- 011-claim-job-tokens.sql: a claim's budget counts what each job needs
-- beyond its prompt and output.
--
-- A worker's engine needs room for a speculative block beside each sequence's
-- prompt and output (gamma + 1 tokens with DSpark). Until now the worker took
-- that room out of its budget for every empty slot, whether or not a job would
-- fill it: with a small KV pool and many empty slots, the reserve kept out jobs
-- that fitted (256 slots of gamma 16 held back 4,600 tokens). claim_jobs now
-- takes p_job_tokens, added to the cost of each job it weighs against
-- p_token_budget, so the room is counted for the jobs claimed and no others.
-- Callers that leave it out count 0, as before.

DROP FUNCTION dspark.claim_jobs(text, int, bigint, int, text[]);
CREATE FUNCTION dspark.claim_jobs(
    p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL, p_job_tokens int DEFAULT 0)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- One statement: lock the candidates in claim order (the locks last until
    -- the caller commits), pick the prefix within the budget that stops
    -- before the first job that runs alone (or that job alone, when it is
    -- first in line and the worker holds nothing), update them by primary
    -- key, and notify them. A worker that runs a job alone picks nothing.
    RETURN QUERY
    WITH picked AS (
        SELECT ca.id
        FROM (SELECT cd.id,
                     row_number() OVER w AS ord,
                     sum(cd.cost) OVER w AS running_total,
                     bool_or(cd.run_alone) OVER w AS alone_so_far
              FROM (SELECT c.id, c.priority, c.run_alone,
                           CASE WHEN p_token_budget IS NULL THEN 0
                                ELSE dspark.prompt_tokens_est(c.prompt, c.messages, c.prompt_ids)
                                     + c.max_tokens + greatest(p_job_tokens, 0) END AS cost
                    FROM dspark.jobs c
                    WHERE c.state = 'queued' AND c.run_after <= now()
                      AND (p_models IS NULL OR c.model = ANY (p_models))
                    ORDER BY c.priority DESC, c.id
                    LIMIT greatest(p_max_jobs, 0)
                    FOR UPDATE SKIP LOCKED) cd
              WINDOW w AS (ORDER BY cd.priority DESC, cd.id)) ca
        WHERE (p_token_budget IS NULL OR ca.running_total <= p_token_budget)
          AND (NOT ca.alone_so_far
               OR (ca.ord = 1 AND NOT EXISTS (SELECT FROM dspark.jobs h
                                              WHERE h.state = 'running' AND h.worker_id = p_worker_id)))
          AND NOT EXISTS (SELECT FROM dspark.jobs h
                          WHERE h.run_alone AND h.state = 'running' AND h.worker_id = p_worker_id)
          -- first in line read without locks, so that a job that runs alone is
          -- seen first in line by every worker that holds jobs even while another
          -- claimer has it locked (they skip nothing and take nothing); looked
          -- at only while some job waits to run alone (normally none: one probe
          -- of an empty index)
          AND NOT (EXISTS (SELECT FROM dspark.jobs a
                           WHERE a.run_alone AND a.state = 'queued')
                   AND coalesce((SELECT q.run_alone FROM dspark.jobs q
                             WHERE q.state = 'queued' AND q.run_after <= now()
                               AND (p_models IS NULL OR q.model = ANY (p_models))
                             ORDER BY q.priority DESC, q.id
                             LIMIT 1), false)
                   AND EXISTS (SELECT FROM dspark.jobs h
                               WHERE h.state = 'running' AND h.worker_id = p_worker_id))
    ), claimed AS (
        UPDATE dspark.jobs j
        SET state = 'running', attempt = j.attempt + 1, worker_id = p_worker_id,
            version = j.version + 1, started_at = now(),
            lease_expires_at = now() + make_interval(secs => greatest(p_lease_seconds, 1))
        WHERE j.id = ANY (ARRAY(SELECT pk.id FROM picked pk))
        RETURNING j.*
    ), sent AS (
        SELECT dspark.notify_job_changes(ARRAY(
            SELECT dspark.job_change(n.id, n.version, n.state, n.attempt)
            FROM claimed n ORDER BY n.id))
    )
    SELECT cl.* FROM claimed cl WHERE (SELECT count(*) FROM sent) = 1
    ORDER BY cl.priority DESC, cl.id;
END
$$;
COMMENT ON FUNCTION dspark.claim_jobs IS 'claim queued jobs (SKIP LOCKED) within a token budget, each job costing its estimated prompt, max_tokens and p_job_tokens; they become running with a lease; a run_alone job is claimed alone';

REVOKE EXECUTE ON FUNCTION dspark.claim_jobs(text, int, bigint, int, text[], int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.claim_jobs(text, int, bigint, int, text[], int) TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (11, '011-claim-job-tokens');
