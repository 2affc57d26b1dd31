-- 007-attempts.sql: who pays an attempt. A crash is charged to the jobs that
-- could have caused it, a drain to none, and a loading worker keeps its
-- model served.
--
-- 1. A job whose lease expired runs alone. When a worker dies (OOM kill, GPU
--    fault, a job that breaks the engine) every job it held is charged an
--    attempt, and the reaper used to requeue them as they were: with their
--    low ids they were claimed together again, so a job that kills its
--    worker took up to a worker's concurrency of innocent jobs with it to
--    max_attempts. Now the reaper marks such a job run_alone. A worker claims
--    it only when it holds no other job, and claims nothing more while it
--    runs it; when it is first in line (priority, then id), workers that hold
--    jobs claim nothing until one of them is empty, so it is not starved. So
--    after one crash every job the worker held runs once on its own, and only
--    the job that crashes again spends its other attempts. (The price: after
--    a crash the jobs it held run one at a time per worker.) claim_jobs stays
--    one statement, as in 003; while some job waits to run alone, it reads who
--    is first in line without locks, so that a busy worker does not claim past
--    such a job while another claimer holds it locked.
-- 2. A hand-back is not an attempt. release_jobs (a drain that ran out of
--    time) counts in released; max_attempts limits attempt - released, the
--    claims that ended with an expired lease or a write-back. attempt itself
--    still counts every claim, so write-backs stay fenced on it.
-- 3. claim_unserved: the unknown-model sweep's claim of jobs it is about to
--    fail, without the budget and the run_alone rule (those jobs do not run).
-- 4. worker_starting: a worker announces itself (state 'starting') before it
--    loads its model, and keeps its heartbeat while it loads, so that the
--    sweep counts its model as served (it used to register only once loaded:
--    after a stop of more than ten minutes, the first worker up failed the
--    queued jobs of models whose workers were still loading).

ALTER TABLE dspark.jobs
    ADD COLUMN run_alone boolean NOT NULL DEFAULT false,
    ADD COLUMN released int NOT NULL DEFAULT 0;
COMMENT ON COLUMN dspark.jobs.run_alone IS 'an earlier attempt ended with an expired lease: claimed only by a worker that holds no other job';
COMMENT ON COLUMN dspark.jobs.released IS 'claims handed back by draining workers (release_jobs); max_attempts limits attempt - released';

-- The jobs that run or wait to run alone: normally none, so claims look here
-- for the price of an index probe each.
CREATE INDEX jobs_running_alone_idx ON dspark.jobs (worker_id)
    WHERE run_alone AND state = 'running';
CREATE INDEX jobs_queued_alone_idx ON dspark.jobs (id)
    WHERE run_alone AND state = 'queued';

CREATE OR REPLACE FUNCTION dspark.claim_jobs(
    p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL)
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
                                     + c.max_tokens END AS cost
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
COMMENT ON FUNCTION dspark.claim_jobs IS 'claim queued jobs (SKIP LOCKED) within a token budget; they become running with a lease; a run_alone job is claimed alone';

-- The unknown-model sweep: claim up to p_max_jobs queued, due jobs of p_model
-- to fail them (dspark-worker writes them back as failed with the reason).
CREATE FUNCTION dspark.claim_unserved(p_worker_id text, p_model text, p_max_jobs int, p_lease_seconds int)
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
COMMENT ON FUNCTION dspark.claim_unserved IS 'claim queued jobs of a model no worker serves, to fail them (the unknown-model sweep)';

CREATE OR REPLACE FUNCTION dspark.release_jobs(p_worker_id text, p_job_ids bigint[], p_attempts int[])
RETURNS SETOF bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH released AS (
        UPDATE dspark.jobs j
        SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'queued' END,
            finished_at = CASE WHEN j.cancel_requested THEN now() END,
            finish_reason = CASE WHEN j.cancel_requested THEN 'cancelled' END,
            lease_expires_at = NULL, worker_id = NULL, version = j.version + 1,
            released = j.released + 1
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
COMMENT ON FUNCTION dspark.release_jobs IS 'give running jobs back to the queue (drain); the claim does not count against max_attempts';

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
                         WHEN j.attempt - j.released >= j.max_attempts THEN 'failed'
                         ELSE 'queued' END,
            error = CASE WHEN NOT j.cancel_requested AND j.attempt - j.released >= j.max_attempts
                         THEN format('lease expired after %s attempts', j.attempt - j.released)
                         ELSE j.error END,
            finish_reason = CASE WHEN j.cancel_requested THEN 'cancelled'
                                 WHEN j.attempt - j.released >= j.max_attempts THEN 'error' END,
            finished_at = CASE WHEN j.cancel_requested OR j.attempt - j.released >= j.max_attempts
                               THEN now() END,
            worker_id = CASE WHEN j.cancel_requested OR j.attempt - j.released >= j.max_attempts
                             THEN j.worker_id END,
            run_alone = true,
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
COMMENT ON FUNCTION dspark.requeue_expired IS 'lease reaper: requeue (to run alone), fail after max_attempts, or cancel; NULL when another session holds the reaper lock';

-- A worker about to load its model: upsert its row as 'starting' (what the
-- last process of this worker_id registered is cleared). dspark-worker calls
-- it again every few seconds while it loads, as its heartbeat. A new process
-- under a worker_id that held jobs (dsparkd restarts a worker under the same
-- id) means the old one is gone: its leases end now, so the reaper requeues
-- them at its next pass instead of after the lease.
CREATE FUNCTION dspark.worker_starting(
    p_worker_id text, p_host text, p_pid int, p_device text, p_model text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dspark.jobs j
    SET lease_expires_at = now(), version = j.version + 1
    WHERE j.state = 'running' AND j.worker_id = p_worker_id
      AND NOT EXISTS (SELECT FROM dspark.workers w
                      WHERE w.worker_id = p_worker_id AND w.pid = p_pid AND w.host = p_host);
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
$$;
COMMENT ON FUNCTION dspark.worker_starting IS 'a worker announces itself before loading its model (state starting); repeated as its heartbeat while it loads';

REVOKE EXECUTE ON FUNCTION
    dspark.claim_unserved(text, text, int, int),
    dspark.worker_starting(text, text, int, text, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    dspark.claim_unserved(text, text, int, int),
    dspark.worker_starting(text, text, int, text, text)
TO dspark_worker, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (7, '007-attempts');
