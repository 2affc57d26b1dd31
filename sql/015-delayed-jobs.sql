-- 015-delayed-jobs.sql: jobs that may not run yet stay out of the claims' way;
-- and a claimer no longer waits for another to step the clients' turn.
--
-- A claim walked the queued jobs in claim order and read past those whose
-- run_after had not come, row by row (their row, from the heap, tells it): a
-- client that queued 200,000 jobs for tonight cost every claim of its model
-- about 70 ms in turns, 30 ms in the statement of before when they came first
-- by id. Now such a job is marked delayed when it is queued (a trigger, on
-- insert and when run_after or the state changes), and the claims' two indexes
-- leave delayed jobs out. Once due, a job's mark is cleared, and idle workers
-- are woken by a notification, by dspark.promote_due_jobs: dsparkd runs it
-- each second for every model, in transactions of 2,000 jobs, and each claim
-- first for its own models, up to 1,000 jobs (one index probe when none is
-- due). A job is still claimed only once run_after has passed, mark or not:
-- the mark only lets the claims' scans skip what cannot run. While more than
-- 1,000 jobs of a model came due since dsparkd's last pass, the claims take
-- the earliest due first, whatever their priority or client, until dsparkd
-- has cleared them all (about 15 ms for each 2,000).
-- Other readers of the queued jobs (dsparkd's counts, the workers' look for
-- models nobody serves) read the two indexes, delayed and not.
--
-- In turns (014), a claimer that found the model's claim_turn row held by
-- another tried to insert it, and so waited until that one committed; it now
-- inserts the row only when there is none, and of two claimers that find none
-- at once, only the one that takes an advisory lock does.
--
-- Upgrading takes an exclusive lock on dspark.jobs, which holds every query
-- on it back, for an update of the queued jobs to run later and four index
-- builds (2.6–2.7 s with 300,000 jobs, 200,000 of them to run later, on two
-- cores).

ALTER TABLE dspark.jobs ADD COLUMN delayed boolean NOT NULL DEFAULT false;
-- (workers and dsparkd count the queued jobs through the two indexes: delayed or not)
GRANT SELECT (delayed) ON dspark.jobs TO dspark_worker;
COMMENT ON COLUMN dspark.jobs.delayed IS 'queued with run_after still to come: out of the claims'' indexes until dspark.promote_due_jobs finds it due';

-- (the version bumped as the queue functions do, so jobs_before_update stays out)
UPDATE dspark.jobs SET delayed = true, version = version + 1 WHERE state = 'queued' AND run_after > now();

-- Marks a job delayed; the WHEN clause calls it only for a queued job whose
-- run_after is still to come and that is not marked yet (so never for a job
-- submitted to run at once). The mark is cleared only by promote_due_jobs.
CREATE FUNCTION dspark.jobs_mark_delayed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.delayed := true;
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_mark_delayed BEFORE INSERT OR UPDATE OF state, run_after ON dspark.jobs
    FOR EACH ROW WHEN (NEW.state = 'queued' AND NOT NEW.delayed AND NEW.run_after > pg_catalog.now())
    EXECUTE FUNCTION dspark.jobs_mark_delayed();

DROP INDEX dspark.jobs_claim_idx;
CREATE INDEX jobs_claim_idx ON dspark.jobs (priority DESC, id) WHERE state = 'queued' AND NOT delayed;
DROP INDEX dspark.jobs_queued_owner_idx;
CREATE INDEX jobs_queued_owner_idx ON dspark.jobs (model, owner, priority DESC, id)
    WHERE state = 'queued' AND NOT delayed;
-- the delayed jobs in the order they come due, of every model and of each
CREATE INDEX jobs_delayed_idx ON dspark.jobs (run_after) WHERE state = 'queued' AND delayed;
CREATE INDEX jobs_delayed_model_idx ON dspark.jobs (model, run_after) WHERE state = 'queued' AND delayed;

-- Clears the mark of up to p_limit delayed jobs of model p_model (NULL: of
-- every model) whose run_after has passed, the earliest first, skipping
-- those another session holds; returns how many. When it cleared any, it
-- sends one notification 'due:MODEL' ('due:*' for every model) on
-- dspark_events, which names no job (their state did not change): idle
-- workers take it as a hint to claim. dsparkd calls it for every model each
-- second, a claim for its own models first, with a small limit.
CREATE FUNCTION dspark.promote_due_jobs(p_model text DEFAULT NULL, p_limit int DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint := 0;
BEGIN
    -- (the earliest delayed job, rather than a test of run_after: with many
    -- delayed jobs the plan would scan the table for the test)
    -- delayed jobs (none: NULL, not due)
    IF p_model IS NULL THEN
        IF NOT coalesce((SELECT min(d.run_after) FROM dspark.jobs d WHERE d.state = 'queued' AND d.delayed)
                        <= now(), false) THEN
            RETURN 0;
        END IF;
    ELSIF NOT coalesce((SELECT min(d.run_after) FROM dspark.jobs d
                        WHERE d.state = 'queued' AND d.delayed AND d.model = p_model) <= now(), false) THEN
        RETURN 0;
    END IF;
    WITH due AS (
        SELECT d.id FROM dspark.jobs d
        WHERE d.state = 'queued' AND d.delayed AND d.run_after <= now() AND p_model IS NULL
        ORDER BY d.run_after
        LIMIT greatest(p_limit, 1)
        FOR UPDATE SKIP LOCKED
    ), due_of_model AS (
        SELECT d.id FROM dspark.jobs d
        WHERE d.state = 'queued' AND d.delayed AND d.model = p_model AND d.run_after <= now()
        ORDER BY d.model, d.run_after
        LIMIT greatest(p_limit, 1)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE dspark.jobs j SET delayed = false, version = j.version + 1
    WHERE j.id = ANY (ARRAY(SELECT id FROM due UNION ALL SELECT id FROM due_of_model));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('dspark_events', 'due:' || coalesce(p_model, '*'));
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION dspark.promote_due_jobs IS 'delayed jobs whose run_after has passed join the claims'' indexes, with one notification due:MODEL on dspark_events (dsparkd each second; claim_jobs and claim_unserved for their models first)';
REVOKE EXECUTE ON FUNCTION dspark.promote_due_jobs(text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dspark.promote_due_jobs(text, int) TO dspark_worker, dspark_admin;

-- The claims, restated with the delayed jobs left out of their scans ------------

-- The first p_count claimable jobs of model p_model in turns among the
-- clients p_owners (two or more, in name order), jobs that run alone left
-- out: their ids in claim order (NULL when none). Of the clients with jobs
-- to claim, the order of a turn starts at the one at index p_first modulo
-- their number (from 0). Each client's first jobs come from
-- jobs_queued_owner_idx, at first p_count / clients of them, as many as it
-- takes when every client has jobs of one priority. More are read (twice as
-- many each time) while the list could be wrong: it is short and some client
-- may have more, or a client whose read stopped has a job of a priority or
-- turn that would come before the last one in the list.
CREATE OR REPLACE FUNCTION dspark.claim_turns(p_owners name[], p_model text, p_count int, p_first bigint, OUT ids bigint[])
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_each int := greatest(ceil(p_count::numeric / greatest(cardinality(p_owners), 1))::int, 1);
    v_sure boolean;
BEGIN
    LOOP
        WITH got AS (   -- each client's first v_each claimable jobs, numbered in turns
            SELECT e.id, e.priority, e.owner,
                   row_number() OVER (PARTITION BY e.owner, e.priority ORDER BY e.id) AS turn,
                   count(*) OVER (PARTITION BY e.owner) = v_each AS cut,
                   dense_rank() OVER (ORDER BY o.i) AS k   -- among the clients with jobs to claim, from 1
            FROM unnest(p_owners) WITH ORDINALITY AS o(owner, i)
            CROSS JOIN LATERAL (
                SELECT c.id, c.priority, c.owner
                FROM dspark.jobs c
                -- (the owner as a range of one: with an equality the planner drops owner
                -- from the ORDER BY, and may walk jobs_claim_idx past every other client's
                -- jobs instead)
                WHERE c.state = 'queued' AND NOT c.delayed AND c.model = p_model
                  AND c.owner >= o.owner AND c.owner <= o.owner
                  AND NOT c.run_alone AND c.run_after <= now()
                  AND (c.expires_at IS NULL OR c.expires_at > now())
                ORDER BY c.model, c.owner, c.priority DESC, c.id
                LIMIT v_each) e
        ), read AS (   -- with each client's place in a turn: the rotation p_first, over those clients
            SELECT g.id, g.priority, g.owner, g.turn, g.cut, (g.k - 1 - p_first % g.n + g.n) % g.n AS place
            FROM (SELECT g.*, max(g.k) OVER () AS n FROM got g) g
        ), listed AS (
            SELECT r.id, r.priority, r.turn,
                   row_number() OVER (ORDER BY r.priority DESC, r.turn, r.place, r.id) AS ord
            FROM read r
            ORDER BY r.priority DESC, r.turn, r.place, r.id
            LIMIT p_count
        ), last AS (
            SELECT l.priority, l.turn, (SELECT count(*) FROM listed) AS n FROM listed l ORDER BY l.ord DESC LIMIT 1
        )
        SELECT array_agg(l.id ORDER BY l.ord),
               -- sure: no client whose read was cut could have a job that belongs in the list
               NOT EXISTS (
                   SELECT FROM read r, last
                   WHERE r.cut
                   GROUP BY r.owner, last.priority, last.turn, last.n
                   HAVING last.n < p_count
                       -- its next job: of its last job's priority or a lower one; of the
                       -- list's last priority, it comes after the list when its turn does
                       OR min(r.priority) > last.priority
                       OR (min(r.priority) = last.priority
                           AND count(*) FILTER (WHERE r.priority = last.priority) < last.turn))
        INTO ids, v_sure
        FROM listed l;
        EXIT WHEN ids IS NULL OR v_sure OR v_each >= p_count;
        v_each := least(v_each * 2, p_count);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION dspark.claim_jobs(
    p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL, p_job_tokens int DEFAULT 0)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_n int := least(greatest(p_max_jobs, 0), 1000000);
    v_model text := CASE WHEN cardinality(p_models) = 1 THEN p_models[1] END;
    v_owners name[];   -- the clients with queued jobs of v_model, in name order
    v_ids bigint[];    -- with two or more: the claimable jobs in claim order
    v_held bigint[];   -- those of them locked here, in claim order
    v_first bigint;    -- where the turn starts among the clients (dspark.claim_turn)
    v_rows bigint;
    v_alone_first boolean;   -- a job that runs alone is first in line (by priority and id)
BEGIN
    -- The delayed jobs of the claim's models that came due since dsparkd's
    -- last pass join the queue first, up to 1,000 of them (a larger backlog
    -- is dsparkd's: a claim that held more of them locked until it commits
    -- would hide them from the other claimers meanwhile).
    IF p_models IS NULL THEN
        PERFORM dspark.promote_due_jobs(NULL, 1000);
    ELSE
        PERFORM dspark.promote_due_jobs(m.model, 1000) FROM unnest(p_models) AS m(model);
    END IF;
    -- First in line read without locks, so that a job that runs alone is seen
    -- first in line by every worker that holds jobs even while another claimer
    -- has it locked (they skip nothing and take nothing); looked at only while
    -- some job waits to run alone (normally none: one probe of an empty index).
    v_alone_first := EXISTS (SELECT FROM dspark.jobs a WHERE a.run_alone AND a.state = 'queued')
                     AND coalesce((SELECT q.run_alone FROM dspark.jobs q
                                   WHERE q.state = 'queued' AND NOT q.delayed AND q.run_after <= now()
                                     AND (q.expires_at IS NULL OR q.expires_at > now())
                                     AND (p_models IS NULL OR q.model = ANY (p_models))
                                   ORDER BY q.priority DESC, q.id
                                   LIMIT 1), false);
    -- turns: for one model, and while no job that runs alone is first in line
    IF v_model IS NOT NULL AND v_n > 0 AND NOT v_alone_first THEN
        v_owners := ARRAY(
            WITH RECURSIVE o(owner) AS (
                (SELECT c.owner FROM dspark.jobs c WHERE c.state = 'queued' AND NOT c.delayed AND c.model = v_model
                 ORDER BY c.model, c.owner LIMIT 1)
                UNION ALL
                SELECT (SELECT c.owner FROM dspark.jobs c
                        WHERE c.state = 'queued' AND NOT c.delayed AND c.model = v_model AND c.owner > o.owner
                        ORDER BY c.model, c.owner LIMIT 1)
                FROM o WHERE o.owner IS NOT NULL)
            SELECT o.owner FROM o WHERE o.owner IS NOT NULL);
    END IF;
    -- The list is read in a snapshot of its own, and claimers at the same
    -- moment may hold or have taken every job of it by the time it is locked:
    -- then it is read again, twice as long (three times at most; then the
    -- statement of before takes what it finds, so a claim never comes back
    -- empty for that). A claim may also come back shorter than it could be,
    -- when others hold most of the list; the worker claims again.
    IF cardinality(v_owners) > 1 THEN
        v_first := coalesce((SELECT t.next FROM dspark.claim_turn t WHERE t.model = v_model), 0);
    END IF;
    FOR v_try IN 1 .. CASE WHEN cardinality(v_owners) > 1 THEN 3 ELSE 0 END LOOP
        SELECT t.ids INTO v_ids
        FROM dspark.claim_turns(v_owners, v_model, (1 << v_try) * v_n, v_first) t;
        EXIT WHEN v_ids IS NULL;   -- nothing to claim
        v_held := ARRAY(
            SELECT l.id
            FROM (SELECT c.id, u.ord
                  FROM unnest(v_ids) WITH ORDINALITY AS u(id, ord)
                  JOIN dspark.jobs c ON c.id = u.id
                  -- checked again on the locked row
                  WHERE c.state = 'queued' AND NOT c.run_alone AND c.run_after <= now()
                    AND (c.expires_at IS NULL OR c.expires_at > now())
                  ORDER BY u.ord
                  LIMIT v_n
                  FOR UPDATE OF c SKIP LOCKED) l
            ORDER BY l.ord);
        EXIT WHEN cardinality(v_held) > 0;
        v_held := NULL;
    END LOOP;

    -- One statement: lock the candidates in claim order (the locks last until
    -- the caller commits), pick the prefix within the budget that stops
    -- before the first job that runs alone (or that job alone, when it is
    -- first in line and the worker holds nothing), update them by primary
    -- key, and notify them. A worker that runs a job alone picks nothing.
    -- The candidates come from one of two branches: the index scan of before
    -- (place 0 for all), which locks them here, or the jobs in turns, locked
    -- above (place: their rank in the turns; priorities come first in both).
    RETURN QUERY
    WITH picked AS (
        SELECT ca.id, ca.ord
        FROM (SELECT cd.id,
                     row_number() OVER w AS ord,
                     sum(CASE WHEN p_token_budget IS NULL THEN 0
                              ELSE dspark.prompt_tokens_est(cd.prompt, cd.messages, cd.prompt_ids)
                                   + cd.max_tokens + greatest(p_job_tokens, 0) END) OVER w AS running_total,
                     bool_or(cd.run_alone) OVER w AS alone_so_far
              FROM (SELECT * FROM (
                        SELECT c.id, c.priority, c.run_alone, c.prompt, c.messages, c.prompt_ids, c.max_tokens,
                               0::bigint AS place
                        FROM dspark.jobs c
                        WHERE v_held IS NULL AND c.state = 'queued' AND NOT c.delayed AND c.run_after <= now()
                          AND (c.expires_at IS NULL OR c.expires_at > now())
                          AND (p_models IS NULL OR c.model = ANY (p_models))
                        ORDER BY c.priority DESC, c.id
                        LIMIT v_n
                        FOR UPDATE SKIP LOCKED) one_client
                    UNION ALL
                    SELECT c.id, c.priority, c.run_alone, c.prompt, c.messages, c.prompt_ids, c.max_tokens,
                           u.place
                    FROM unnest(v_held) WITH ORDINALITY AS u(id, place)
                    JOIN dspark.jobs c ON c.id = u.id) cd
              WINDOW w AS (ORDER BY cd.priority DESC, cd.place, cd.id)) ca
        WHERE (p_token_budget IS NULL OR ca.running_total <= p_token_budget)
          AND (NOT ca.alone_so_far
               OR (ca.ord = 1 AND NOT EXISTS (SELECT FROM dspark.jobs h
                                              WHERE h.state = 'running' AND h.worker_id = p_worker_id)))
          AND NOT EXISTS (SELECT FROM dspark.jobs h
                          WHERE h.run_alone AND h.state = 'running' AND h.worker_id = p_worker_id)
          -- a worker that holds jobs takes nothing while a job that runs alone is first in line
          AND NOT (v_alone_first AND EXISTS (SELECT FROM dspark.jobs h
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
    SELECT cl.* FROM claimed cl JOIN picked pk ON pk.id = cl.id
    WHERE (SELECT count(*) FROM sent) = 1
    ORDER BY pk.ord;

    -- jobs taken in turns: the model's next claim starts at the next client
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    IF v_held IS NOT NULL AND v_rows > 0 THEN
        UPDATE dspark.claim_turn t SET next = t.next + 1
        WHERE t.model IN (SELECT l.model FROM dspark.claim_turn l WHERE l.model = v_model
                          FOR UPDATE SKIP LOCKED);
        -- (a row that another claimer holds is left to it: only a missing row is
        -- inserted, since an insert would wait for that claimer to commit; and
        -- of two claimers that find it missing, the one without the lock leaves
        -- the insert to the other)
        IF NOT FOUND AND NOT EXISTS (SELECT FROM dspark.claim_turn t WHERE t.model = v_model)
           AND pg_try_advisory_xact_lock(hashtext('dspark.claim_turn'), hashtext(v_model)) THEN
            INSERT INTO dspark.claim_turn (model, next) VALUES (v_model, 1) ON CONFLICT (model) DO NOTHING;
        END IF;
    END IF;
END
$$;

COMMENT ON FUNCTION dspark.claim_jobs IS 'claim queued jobs (SKIP LOCKED) within a token budget, each job costing its estimated prompt, max_tokens and p_job_tokens, none past its expires_at; by priority, then, for one model, the clients with jobs queued take turns (one job each a turn, the clients in an order that moves on by one a claim); they become running with a lease, returned in claim order; a run_alone job is claimed alone, when first in line by priority and id';

CREATE OR REPLACE FUNCTION dspark.claim_unserved(p_worker_id text, p_model text, p_max_jobs int,
                                                 p_lease_seconds int)
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

INSERT INTO dspark.schema_version (version, name) VALUES (15, '015-delayed-jobs');
