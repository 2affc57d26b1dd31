-- 002-queue.sql: the queue functions.
--
-- Worker side (SECURITY DEFINER, EXECUTE granted to dspark_worker and
-- dspark_admin): register_worker, set_worker_state, claim_jobs, heartbeat,
-- finish_jobs, release_jobs; dsparkd: requeue_expired, prune.
-- Client side (SECURITY INVOKER, row-level security applies): cancel_jobs,
-- cancel_batch. Views for everyone: queue_status, worker_status.
--
-- Every statement that changes job states sends one notification on
-- 'dspark_events' (the statement triggers of 001), so a claim of 64 jobs or a
-- write-back of a whole round costs one NOTIFY. The functions bump each
-- row's version themselves (see the row trigger in 001); the hot ones keep
-- generic plans, so that a call does not plan its statement again.

CREATE FUNCTION dspark.register_worker(
    p_worker_id text, p_host text, p_pid int, p_device text, p_model text,
    p_draft text, p_model_checksum text, p_draft_checksum text,
    p_sps_profile jsonb DEFAULT NULL)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
$$;
COMMENT ON FUNCTION dspark.register_worker IS 'a worker announces itself (upsert by worker_id), state running';

CREATE FUNCTION dspark.set_worker_state(p_worker_id text, p_state text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dspark.workers SET state = p_state, heartbeat_at = now()
    WHERE worker_id = p_worker_id;
$$;
COMMENT ON FUNCTION dspark.set_worker_state IS 'starting, running, draining, stopped';

-- Claim up to p_max_jobs queued jobs that are due, by priority then age,
-- skipping rows other claimers hold. Jobs are admitted in that order while
-- the sum of (estimated prompt tokens + max_tokens) fits p_token_budget, the
-- worker's free KV-cache room; NULL = no limit (an idle worker passes NULL so
-- that a job too large for it is still handed out, and fails with a reason).
-- p_models NULL = any model.
CREATE FUNCTION dspark.claim_jobs(
    p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    ids bigint[];
BEGIN
    -- lock the candidates (the locks last until the caller commits), admit
    -- a prefix within the budget, then update them by primary key
    IF p_token_budget IS NULL THEN
        SELECT array_agg(c.id) INTO ids
        FROM (SELECT j.id
              FROM dspark.jobs j
              WHERE j.state = 'queued' AND j.run_after <= now()
                AND (p_models IS NULL OR j.model = ANY (p_models))
              ORDER BY j.priority DESC, j.id
              LIMIT greatest(p_max_jobs, 0)
              FOR UPDATE SKIP LOCKED) c;
    ELSE
        SELECT array_agg(c.id ORDER BY c.priority DESC, c.id) INTO ids
        FROM (SELECT cd.id, cd.priority,
                     sum(cd.cost) OVER (ORDER BY cd.priority DESC, cd.id) AS running_total
              FROM (SELECT j.id, j.priority,
                           dspark.prompt_tokens_est(j.prompt, j.messages, j.prompt_ids)
                               + j.max_tokens AS cost
                    FROM dspark.jobs j
                    WHERE j.state = 'queued' AND j.run_after <= now()
                      AND (p_models IS NULL OR j.model = ANY (p_models))
                    ORDER BY j.priority DESC, j.id
                    LIMIT greatest(p_max_jobs, 0)
                    FOR UPDATE SKIP LOCKED) cd) c
        WHERE c.running_total <= p_token_budget;
    END IF;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE dspark.jobs j
        SET state = 'running', attempt = j.attempt + 1, worker_id = p_worker_id,
            version = j.version + 1, started_at = now(),
            lease_expires_at = now() + make_interval(secs => greatest(p_lease_seconds, 1))
        WHERE j.id = ANY (ids)
        RETURNING j.*
    )
    SELECT * FROM claimed cl ORDER BY cl.priority DESC, cl.id;
END
$$;
COMMENT ON FUNCTION dspark.claim_jobs IS 'claim queued jobs (SKIP LOCKED) within a token budget; they become running with a lease';

-- Extend the leases of the worker's running jobs (matched on id and attempt)
-- and return the ids it must stop: cancellation requested, or the job is no
-- longer its own (lease lost and requeued, or finished elsewhere).
CREATE FUNCTION dspark.heartbeat(
    p_worker_id text, p_job_ids bigint[], p_attempts int[], p_lease_seconds int)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    UPDATE dspark.workers
    SET heartbeat_at = now(),
        state = CASE WHEN state IN ('lost', 'starting') THEN 'running' ELSE state END
    WHERE worker_id = p_worker_id;
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
COMMENT ON FUNCTION dspark.heartbeat IS 'extend leases; returns the ids to stop (cancelled or no longer held)';

-- Write back finished jobs, one call per round. p_results is a JSON array of
--   {"id": 12, "attempt": 1, "state": "succeeded"|"failed"|"cancelled",
--    "output_text": "...", "output_ids": [..], "finish_reason": "stop"|"length"|...,
--    "error": "...", "stats": {columns of dspark.job_stats, from device to
--    mean_verify_len; others are ignored}}
-- Each is applied only if the job is still running under this worker and
-- attempt (the fence); a stale one is refused. Returns (id, applied) per item.
CREATE FUNCTION dspark.finish_jobs(p_worker_id text, p_results jsonb)
RETURNS TABLE (id bigint, applied boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    bad text;
    ids bigint[];
BEGIN
    IF jsonb_typeof(p_results) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'finish_jobs: results must be a JSON array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg((e->>'id')::bigint),
           min(coalesce(e->>'state', 'null'))
               FILTER (WHERE e->>'state' IS NULL
                       OR e->>'state' NOT IN ('succeeded', 'failed', 'cancelled'))
    INTO ids, bad
    FROM jsonb_array_elements(p_results) e;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'finish_jobs: invalid final state ''%''', bad
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a result''s state is succeeded, failed or cancelled';
    END IF;
    RETURN QUERY
    WITH r AS (
        SELECT DISTINCT ON (x.id) x.*
        FROM jsonb_to_recordset(p_results) AS x(id bigint, attempt int, state text,
             output_text text, output_ids int[], finish_reason text, error text, stats jsonb)
        ORDER BY x.id
    ), done AS (
        UPDATE dspark.jobs j
        SET state = r.state, version = j.version + 1, finished_at = now(),
            lease_expires_at = NULL, output_text = r.output_text, output_ids = r.output_ids,
            finish_reason = coalesce(r.finish_reason,
                                     CASE r.state WHEN 'failed' THEN 'error'
                                                  WHEN 'cancelled' THEN 'cancelled' END),
            error = r.error
        FROM r
        WHERE j.id = ANY (ids) AND j.id = r.id AND j.attempt = r.attempt
          AND j.state = 'running' AND j.worker_id = p_worker_id
        RETURNING j.id, j.attempt, j.owner, j.created_at, j.run_after, j.started_at,
                  j.finished_at, j.finish_reason
    ), stats AS (
        INSERT INTO dspark.job_stats (
            job_id, attempt, owner, worker_id, device, model, draft, model_checksum,
            draft_checksum, queue_wait_s, time_to_first_token_s, e2e_latency_s,
            decode_tokens_per_s, prompt_tokens, output_tokens, rounds, num_draft_tokens,
            num_verified_tokens, num_accepted_tokens, mean_acceptance_length,
            acceptance_by_position, verified_by_position, mean_verify_len, finish_reason)
        SELECT d.id, d.attempt, d.owner, p_worker_id, s.device, s.model, s.draft,
               s.model_checksum, s.draft_checksum,
               coalesce(s.queue_wait_s, extract(epoch FROM d.started_at
                                                - greatest(d.created_at, d.run_after))::float8),
               s.time_to_first_token_s,
               coalesce(s.e2e_latency_s, extract(epoch FROM d.finished_at - d.created_at)::float8),
               s.decode_tokens_per_s, s.prompt_tokens, s.output_tokens, s.rounds,
               s.num_draft_tokens, s.num_verified_tokens, s.num_accepted_tokens,
               s.mean_acceptance_length, s.acceptance_by_position, s.verified_by_position,
               s.mean_verify_len, d.finish_reason
        FROM done d
        JOIN r ON r.id = d.id
        CROSS JOIN LATERAL jsonb_to_record(coalesce(r.stats, '{}')) AS s(
            device text, model text, draft text, model_checksum text, draft_checksum text,
            queue_wait_s float8, time_to_first_token_s float8, e2e_latency_s float8,
            decode_tokens_per_s float8, prompt_tokens int, output_tokens int, rounds int,
            num_draft_tokens bigint, num_verified_tokens bigint, num_accepted_tokens bigint,
            mean_acceptance_length float8, acceptance_by_position int[],
            verified_by_position int[], mean_verify_len float8)
    )
    SELECT r.id, d.id IS NOT NULL
    FROM r LEFT JOIN done d ON d.id = r.id
    ORDER BY r.id;
END
$$;
COMMENT ON FUNCTION dspark.finish_jobs IS 'fenced write-back of finished jobs with their statistics';

-- Hand running jobs back to the queue (worker drain). The attempt number is
-- kept, so a write-back from the old claim stays fenced.
CREATE FUNCTION dspark.release_jobs(p_worker_id text, p_job_ids bigint[], p_attempts int[])
RETURNS SETOF bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dspark.jobs j
    SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'queued' END,
        finished_at = CASE WHEN j.cancel_requested THEN now() END,
        finish_reason = CASE WHEN j.cancel_requested THEN 'cancelled' END,
        lease_expires_at = NULL, worker_id = NULL, version = j.version + 1
    FROM unnest(p_job_ids, p_attempts) AS u(id, attempt)
    WHERE j.id = u.id AND j.attempt = u.attempt AND j.state = 'running'
      AND j.worker_id = p_worker_id
    RETURNING j.id;
$$;
COMMENT ON FUNCTION dspark.release_jobs IS 'give running jobs back to the queue (drain)';

-- The lease reaper: running jobs whose lease expired go back to the queue, or
-- fail once they used max_attempts claims (a job that kills its worker must
-- not kill every worker), or end cancelled when cancellation was requested.
-- Workers silent for longer than p_worker_timeout are marked lost. Only one
-- caller at a time does the work (transaction advisory lock); the others get
-- NULL. Returns the number of jobs changed.
CREATE FUNCTION dspark.requeue_expired(p_worker_timeout interval DEFAULT '1 minute')
RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7234107125306835201) THEN
        RETURN NULL;
    END IF;
    UPDATE dspark.jobs j
    SET state = CASE WHEN j.cancel_requested THEN 'cancelled'
                     WHEN j.attempt >= j.max_attempts THEN 'failed'
                     ELSE 'queued' END,
        error = CASE WHEN NOT j.cancel_requested AND j.attempt >= j.max_attempts
                     THEN format('lease expired after %s attempts', j.attempt)
                     ELSE j.error END,
        finish_reason = CASE WHEN j.cancel_requested THEN 'cancelled'
                             WHEN j.attempt >= j.max_attempts THEN 'error' END,
        finished_at = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts
                           THEN now() END,
        worker_id = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts
                         THEN j.worker_id END,
        lease_expires_at = NULL, version = j.version + 1
    WHERE j.state = 'running' AND j.lease_expires_at < now();
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE dspark.workers
    SET state = 'lost'
    WHERE state IN ('starting', 'running', 'draining')
      AND heartbeat_at < now() - p_worker_timeout;
    RETURN n;
END
$$;
COMMENT ON FUNCTION dspark.requeue_expired IS 'lease reaper: requeue, fail after max_attempts, or cancel; NULL when another session holds the reaper lock';

-- Retention: delete finished jobs (and their statistics) older than
-- p_older_than, then empty batches and departed workers as old. At most
-- p_limit jobs per call (NULL = all). Returns the number of jobs deleted.
CREATE FUNCTION dspark.prune(p_older_than interval, p_limit int DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'prune: interval must be zero or positive, got %', p_older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (their statistics go by the jobs' delete trigger)
    DELETE FROM dspark.jobs
    WHERE id IN (SELECT j.id FROM dspark.jobs j
                 WHERE j.finished_at < now() - p_older_than
                   AND j.state IN ('succeeded', 'failed', 'cancelled')
                 ORDER BY j.finished_at
                 LIMIT p_limit);
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM dspark.batches b
    WHERE b.created_at < now() - p_older_than
      AND NOT EXISTS (SELECT FROM dspark.jobs j WHERE j.batch_id = b.id);
    DELETE FROM dspark.workers
    WHERE state IN ('stopped', 'lost') AND heartbeat_at < now() - p_older_than;
    RETURN n;
END
$$;
COMMENT ON FUNCTION dspark.prune IS 'retention: delete finished jobs older than an interval';

-- Cancel jobs the caller can see: a queued job ends 'cancelled' at once, a
-- running one gets cancel_requested and its worker stops it within a round.
-- Returns the jobs affected with their state afterwards.
CREATE FUNCTION dspark.cancel_jobs(p_ids bigint[])
RETURNS TABLE (id bigint, state text)
LANGUAGE sql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dspark.jobs j
    SET cancel_requested = true
    WHERE j.id = ANY (p_ids) AND j.state IN ('queued', 'running') AND NOT j.cancel_requested
    RETURNING j.id, j.state;
$$;
COMMENT ON FUNCTION dspark.cancel_jobs IS 'cancel queued jobs now and running jobs within a round';

CREATE FUNCTION dspark.cancel_batch(p_batch_id bigint)
RETURNS TABLE (id bigint, state text)
LANGUAGE sql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dspark.jobs j
    SET cancel_requested = true
    WHERE j.batch_id = p_batch_id AND j.state IN ('queued', 'running') AND NOT j.cancel_requested
    RETURNING j.id, j.state;
$$;
COMMENT ON FUNCTION dspark.cancel_batch IS 'cancel every unfinished job of a batch';

-- Queue-wide counts for everyone (no job content): the client's own rows are
-- in dspark.jobs, but depth and worker load concern all owners. These views
-- run with their owner's rights (not security_invoker) on purpose.
CREATE VIEW dspark.queue_status AS
SELECT count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'queued' AND run_after > now()) AS delayed,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'queued'))::float8
           AS oldest_queued_s
FROM dspark.jobs;
COMMENT ON VIEW dspark.queue_status IS 'job counts by state over all owners';

CREATE VIEW dspark.worker_status AS
SELECT w.worker_id, w.host, w.pid, w.device, w.model, w.draft, w.model_checksum,
       w.draft_checksum, w.state, w.started_at, w.heartbeat_at,
       extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age_s,
       (SELECT count(*) FROM dspark.jobs j
        WHERE j.state = 'running' AND j.worker_id = w.worker_id) AS running_jobs
FROM dspark.workers w;
COMMENT ON VIEW dspark.worker_status IS 'workers with their heartbeat age and running job count';

GRANT SELECT ON dspark.queue_status, dspark.worker_status
    TO dspark_client, dspark_worker, dspark_admin;

REVOKE EXECUTE ON FUNCTION
    dspark.register_worker(text, text, int, text, text, text, text, text, jsonb),
    dspark.set_worker_state(text, text),
    dspark.claim_jobs(text, int, bigint, int, text[]),
    dspark.heartbeat(text, bigint[], int[], int),
    dspark.finish_jobs(text, jsonb),
    dspark.release_jobs(text, bigint[], int[]),
    dspark.requeue_expired(interval),
    dspark.prune(interval, int),
    dspark.cancel_jobs(bigint[]),
    dspark.cancel_batch(bigint)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    dspark.register_worker(text, text, int, text, text, text, text, text, jsonb),
    dspark.set_worker_state(text, text),
    dspark.claim_jobs(text, int, bigint, int, text[]),
    dspark.heartbeat(text, bigint[], int[], int),
    dspark.finish_jobs(text, jsonb),
    dspark.release_jobs(text, bigint[], int[]),
    dspark.requeue_expired(interval),
    dspark.prune(interval, int)
TO dspark_worker, dspark_admin;
GRANT EXECUTE ON FUNCTION dspark.cancel_jobs(bigint[]), dspark.cancel_batch(bigint)
TO dspark_client, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (2, '002-queue');
