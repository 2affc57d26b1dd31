-- 012-expiry.sql: jobs that must start by a deadline.
--
-- A job may carry expires_at, the time by which it must have started: the
-- OpenAI and Anthropic batch APIs expire the requests of a batch that did not
-- finish within its window, so that a backlog does not spend GPUs on answers
-- nobody waits for any more. claim_jobs (restated from 011 with that one
-- condition) and claim_unserved (from 007, the same) no longer hand out a
-- queued job past its expires_at, and
-- dspark.expire_jobs, which dsparkd runs with the lease reaper, ends such jobs
-- 'cancelled' with finish_reason 'expired'. A job that runs when its deadline
-- passes runs to its end; one that is back in the queue then (its lease
-- expired, or a draining worker released it) expires there.

ALTER TABLE dspark.jobs ADD COLUMN expires_at timestamptz;
COMMENT ON COLUMN dspark.jobs.expires_at IS 'a job still queued at this time is not run: dspark.expire_jobs ends it cancelled, finish_reason expired (NULL: never)';
GRANT INSERT (expires_at) ON dspark.jobs TO dspark_client;
GRANT SELECT (expires_at) ON dspark.jobs TO dspark_worker;

-- the jobs with a deadline that are still queued: normally few, so the expiry
-- sweep costs an index probe
CREATE INDEX jobs_queued_expiry_idx ON dspark.jobs (expires_at)
    WHERE state = 'queued' AND expires_at IS NOT NULL;

CREATE OR REPLACE FUNCTION dspark.claim_jobs(
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
                      AND (c.expires_at IS NULL OR c.expires_at > now())
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
                               AND (q.expires_at IS NULL OR q.expires_at > now())
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

COMMENT ON FUNCTION dspark.claim_jobs IS 'claim queued jobs (SKIP LOCKED) within a token budget, each job costing its estimated prompt, max_tokens and p_job_tokens, none past its expires_at; they become running with a lease; a run_alone job is claimed alone';

CREATE OR REPLACE FUNCTION dspark.claim_unserved(p_worker_id text, p_model text, p_max_jobs int,
                                                 p_lease_seconds int)
RETURNS SETOF dspark.jobs
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH claimed AS (
        UPDATE dspark.jobs j
        SET state = 'running', attempt = j.attempt + 1, worker_id = p_worker_id,
            version = j.version + 1, started_at = now(),
            lease_expires_at = now() + make_interval(secs => greatest(p_lease_seconds, 1))
        WHERE j.id = ANY (ARRAY(
            SELECT c.id
            FROM dspark.jobs c
            WHERE c.state = 'queued' AND c.run_after <= now() AND c.model = p_model
              AND (c.expires_at IS NULL OR c.expires_at > now())
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

-- End the queued jobs whose deadline has passed, at most p_limit of them (the
-- earliest deadlines first); returns how many. Jobs another session holds
-- locked (being claimed) are left for the next sweep. Like the other queue
-- functions it bumps the versions and sends the notifications itself, so the
-- rows skip jobs_before_update (a PL/pgSQL call per row).
CREATE FUNCTION dspark.expire_jobs(p_limit int DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
    changes text[];
BEGIN
    WITH due AS (
        SELECT d.id
        FROM dspark.jobs d
        WHERE d.state = 'queued' AND d.expires_at IS NOT NULL AND d.expires_at <= now()
        ORDER BY d.expires_at, d.id
        LIMIT greatest(p_limit, 1)
        FOR UPDATE SKIP LOCKED
    ), expired AS (
        UPDATE dspark.jobs j
        SET state = 'cancelled', finished_at = now(), finish_reason = 'expired',
            error = 'still queued at its deadline, '
                    || to_char(j.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC',
            version = j.version + 1
        FROM due
        WHERE j.id = due.id
        RETURNING j.id, j.version, j.state, j.attempt
    )
    SELECT count(*), array_agg(dspark.job_change(e.id, e.version, e.state, e.attempt) ORDER BY e.id)
    INTO n, changes
    FROM expired e;
    PERFORM dspark.notify_job_changes(changes);
    RETURN n;
END
$$;
COMMENT ON FUNCTION dspark.expire_jobs IS 'end queued jobs past their expires_at: cancelled, finish_reason expired (run by dsparkd after the lease reaper)';

REVOKE EXECUTE ON FUNCTION dspark.expire_jobs(int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.expire_jobs(int) TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (12, '012-expiry');
