-- 019-heartbeat-stray-warning.sql: a heartbeat that ends the leases of
-- running jobs its worker did not name says so.
--
-- Since 017 (with 018's watermark) a heartbeat requeues, fails (attempts
-- spent) or cancels (cancel asked for) the running jobs of its worker process
-- that it does not name: claims the worker never heard of, or jobs whose
-- results it could not store. That happened without a word: the jobs showed
-- it only in their events and, when they failed, in their error. Now the
-- heartbeat raises one WARNING naming them (the first 20) with the state each
-- went to. The worker logs its database's warnings (dspark-worker logs them
-- at warning level), and PostgreSQL writes them to its own log under the
-- default log_min_messages. Nothing else changes.

CREATE OR REPLACE FUNCTION dspark.heartbeat(
    p_worker_id text, p_job_ids bigint[], p_attempts int[], p_lease_seconds int,
    p_host text DEFAULT NULL, p_pid int DEFAULT NULL, p_instance text DEFAULT NULL,
    p_heard_until timestamptz DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_registered timestamptz;
    v_changes text[];
    v_ended text[];    -- the strays as 'id (new state)', in id order
BEGIN
    UPDATE dspark.workers w
    SET heartbeat_at = now(),
        state = CASE WHEN state IN ('lost', 'starting') THEN 'running' ELSE state END
    WHERE worker_id = p_worker_id AND dspark.holds_worker_row(p_host, p_pid, p_instance, w.host, w.pid, w.instance)
    RETURNING w.started_at INTO v_registered;
    IF NOT FOUND AND (p_host IS NOT NULL OR p_instance IS NOT NULL) THEN
        PERFORM dspark.refuse_worker_row(p_worker_id, p_instance IS NOT NULL);
    END IF;
    IF p_instance IS NOT NULL AND v_registered IS NOT NULL AND p_heard_until IS NOT NULL THEN
        -- the strays: running under this worker id, claimed by this process before the caller's
        -- watermark, not named
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
              AND j.started_at <= p_heard_until
              AND NOT EXISTS (SELECT FROM unnest(p_job_ids, p_attempts) AS u(id, attempt)
                              WHERE u.id = j.id AND u.attempt = j.attempt)
            RETURNING j.id, j.version, j.state, j.attempt
        )
        SELECT array_agg(dspark.job_change(s.id, s.version, s.state, s.attempt) ORDER BY s.id),
               array_agg(format('%s (%s)', s.id, s.state) ORDER BY s.id)
        INTO v_changes, v_ended
        FROM strays s;
        PERFORM dspark.notify_job_changes(v_changes);
        IF cardinality(v_ended) > 0 THEN
            RAISE WARNING 'heartbeat of worker %: % running job(s) that it did not name ended their leases: %',
                quote_literal(p_worker_id), cardinality(v_ended),
                array_to_string(v_ended[1:20], ', ')
                    || CASE WHEN cardinality(v_ended) > 20 THEN format(' and %s more', cardinality(v_ended) - 20) ELSE '' END
                USING DETAIL = format('Jobs this process claimed at or before %s (the heartbeat''s watermark) that it did '
                                      'not name: claims it did not hear of, or jobs whose results it could not store. '
                                      'Each went back to the queue (its attempt counted), or failed with its attempts '
                                      'spent, or was cancelled as asked.', p_heard_until),
                      HINT = 'Look for lost database connections in the worker''s log before this.';
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

COMMENT ON FUNCTION dspark.heartbeat IS 'extend leases; returns the ids to stop (cancelled or no longer held); with an instance (else host and pid), refuses (55006) a worker whose id another process took over, and (P0002) one whose row is gone; with an instance and p_heard_until, ends the lease of each running job of the worker id that it does not name, claimed since the process registered and at or before p_heard_until (requeued, the attempt counted), with a WARNING naming them';

INSERT INTO dspark.schema_version (version, name) VALUES (19, '019-heartbeat-stray-warning');
