-- 014-client-turns.sql: the clients with queued jobs take turns.
--
-- Until now claim_jobs handed out queued jobs by priority, then by id, across
-- every client: a client that queued 100,000 jobs held every worker until the
-- last of them had started, and the ten jobs that another client queued a
-- minute later waited behind them all. Now, within a priority, the clients
-- with jobs queued (the jobs' owners) take turns: each client's first job,
-- then each one's second, and so on, the jobs of one turn in id order. A
-- client's own jobs keep their order, and priorities still come first. A
-- job's turn is counted among its owner's claimable jobs of its priority at
-- each claim, so a job that comes back to the queue (a lost lease, a
-- hand-back) is near the front of its owner's line again.
--
-- While a single client has jobs queued (one application in front of the
-- service: the usual case), that is the order of before, and claim_jobs runs
-- the statement of before, whose index scan locks the candidates as it finds
-- them. With several, the order is worked out first, without locks: a loose
-- scan of jobs_queued_owner_idx finds the clients, the same index gives each
-- one's first jobs, and of twice as many candidates as the claim asks for,
-- the first that no other claimer holds are locked in that order (SKIP
-- LOCKED), so that a claimer at the same moment takes the ones after them.
-- When other claimers hold or took the whole list meanwhile, a list twice as
-- long is worked out; after three such misses the index scan of before takes
-- what it finds.
-- The index costs an entry per queued row version (an insert or a requeue);
-- claims and write-backs add none, since their rows are no longer queued.

CREATE INDEX jobs_queued_owner_idx ON dspark.jobs (owner, priority DESC, id) WHERE state = 'queued';

-- The first p_count claimable jobs in turns among the clients p_owners (two
-- or more), with each one's turn: ids and turns in claim order (NULL when
-- none). Each client's first jobs come from jobs_queued_owner_idx, at first
-- p_count / clients of them, as many as it takes when every client has
-- jobs of one priority. More are read (twice as many each time) while the
-- list could be wrong: it is short and some client may have more, or a
-- client whose read stopped has a job of a priority or turn that would come
-- before the last one in the list.
CREATE FUNCTION dspark.claim_turns(p_owners name[], p_models text[], p_count int,
                                   OUT ids bigint[], OUT turns bigint[])
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_each int := greatest(ceil(p_count::numeric / greatest(cardinality(p_owners), 1))::int, 1);
    v_sure boolean;
BEGIN
    LOOP
        WITH read AS (   -- each client's first v_each claimable jobs, numbered in turns
            SELECT e.id, e.priority, e.owner,
                   row_number() OVER (PARTITION BY e.owner, e.priority ORDER BY e.id) AS turn,
                   count(*) OVER (PARTITION BY e.owner) = v_each AS cut
            FROM unnest(p_owners) AS o(owner)
            CROSS JOIN LATERAL (
                SELECT c.id, c.priority, c.owner
                FROM dspark.jobs c
                -- (the owner as a range of one: with an equality the planner drops owner
                -- from the ORDER BY, and may walk jobs_claim_idx past every other client's
                -- jobs instead)
                WHERE c.state = 'queued' AND c.owner >= o.owner AND c.owner <= o.owner
                  AND c.run_after <= now()
                  AND (c.expires_at IS NULL OR c.expires_at > now())
                  AND (p_models IS NULL OR c.model = ANY (p_models))
                ORDER BY c.owner, c.priority DESC, c.id
                LIMIT v_each) e
        ), listed AS (
            SELECT r.id, r.priority, r.turn, row_number() OVER (ORDER BY r.priority DESC, r.turn, r.id) AS ord
            FROM read r
            ORDER BY r.priority DESC, r.turn, r.id
            LIMIT p_count
        ), last AS (
            SELECT l.priority, l.turn, (SELECT count(*) FROM listed) AS n FROM listed l ORDER BY l.ord DESC LIMIT 1
        )
        SELECT array_agg(l.id ORDER BY l.ord), array_agg(l.turn ORDER BY l.ord),
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
        INTO ids, turns, v_sure
        FROM listed l;
        EXIT WHEN ids IS NULL OR v_sure OR v_each >= p_count;
        v_each := least(v_each * 2, p_count);
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION dspark.claim_turns(name[], text[], int) FROM PUBLIC;   -- claim_jobs' part

CREATE OR REPLACE FUNCTION dspark.claim_jobs(
    p_worker_id text, p_max_jobs int, p_token_budget bigint,
    p_lease_seconds int, p_models text[] DEFAULT NULL, p_job_tokens int DEFAULT 0)
RETURNS SETOF dspark.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_n int := greatest(p_max_jobs, 0);
    v_owners name[];   -- the clients with queued jobs, in name order
    v_ids bigint[];    -- with two or more: the claimable jobs in claim order ...
    v_turns bigint[];  -- ... and each one's turn among its owner's jobs of its priority
    v_held bigint[];   -- those of them locked here, in claim order ...
    v_held_turns bigint[];
BEGIN
    v_owners := ARRAY(
        WITH RECURSIVE o(owner) AS (
            (SELECT c.owner FROM dspark.jobs c WHERE c.state = 'queued' ORDER BY c.owner LIMIT 1)
            UNION ALL
            SELECT (SELECT c.owner FROM dspark.jobs c
                    WHERE c.state = 'queued' AND c.owner > o.owner
                    ORDER BY c.owner LIMIT 1)
            FROM o WHERE o.owner IS NOT NULL)
        SELECT o.owner FROM o WHERE o.owner IS NOT NULL);
    -- The list is read in a snapshot of its own, and claimers at the same
    -- moment may hold or have taken every job of it by the time it is locked:
    -- then it is read again, twice as long (three times at most; then the
    -- index scan of before takes what it finds, so a claim never comes back
    -- empty for that).
    FOR v_try IN 1 .. CASE WHEN cardinality(v_owners) > 1 THEN 3 ELSE 0 END LOOP
        SELECT t.ids, t.turns INTO v_ids, v_turns
        FROM dspark.claim_turns(v_owners, p_models, (1 << v_try) * v_n) t;
        EXIT WHEN v_ids IS NULL;   -- nothing to claim
        SELECT array_agg(l.id ORDER BY l.ord), array_agg(l.turn ORDER BY l.ord)
        INTO v_held, v_held_turns
        FROM (SELECT c.id, u.turn, u.ord
              FROM unnest(v_ids, v_turns) WITH ORDINALITY AS u(id, turn, ord)
              JOIN dspark.jobs c ON c.id = u.id
              WHERE c.state = 'queued'   -- checked again on the locked row
              ORDER BY u.ord
              LIMIT v_n
              FOR UPDATE OF c SKIP LOCKED) l;
        EXIT WHEN v_held IS NOT NULL;
    END LOOP;

    -- One statement: lock the candidates in claim order (the locks last until
    -- the caller commits), pick the prefix within the budget that stops
    -- before the first job that runs alone (or that job alone, when it is
    -- first in line and the worker holds nothing), update them by primary
    -- key, and notify them. A worker that runs a job alone picks nothing.
    -- The candidates come from one of two branches: the index scan of before
    -- (one client queued: every turn is 0), which locks them here, or the
    -- jobs in turns, locked above.
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
                               0::bigint AS turn
                        FROM dspark.jobs c
                        WHERE v_held IS NULL AND c.state = 'queued' AND c.run_after <= now()
                          AND (c.expires_at IS NULL OR c.expires_at > now())
                          AND (p_models IS NULL OR c.model = ANY (p_models))
                        ORDER BY c.priority DESC, c.id
                        LIMIT v_n
                        FOR UPDATE SKIP LOCKED) one_client
                    UNION ALL
                    SELECT c.id, c.priority, c.run_alone, c.prompt, c.messages, c.prompt_ids, c.max_tokens,
                           u.turn
                    FROM unnest(v_held, v_held_turns) AS u(id, turn)
                    JOIN dspark.jobs c ON c.id = u.id) cd
              WINDOW w AS (ORDER BY cd.priority DESC, cd.turn, cd.id)) ca
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
          -- of an empty index). The first in line by priority and id is also
          -- the first in turns: it is its owner's first job of that priority.
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
    SELECT cl.* FROM claimed cl JOIN picked pk ON pk.id = cl.id
    WHERE (SELECT count(*) FROM sent) = 1
    ORDER BY pk.ord;
END
$$;

COMMENT ON FUNCTION dspark.claim_jobs IS 'claim queued jobs (SKIP LOCKED) within a token budget, each job costing its estimated prompt, max_tokens and p_job_tokens, none past its expires_at; by priority, then the clients with jobs queued take turns (one job each a turn, in id order); they become running with a lease, returned in claim order; a run_alone job is claimed alone';

-- Each client's queued and running jobs (dsparkctl status --clients): for
-- operators only, since it names every client.
CREATE VIEW dspark.client_status AS
SELECT j.owner AS client,
       count(*) FILTER (WHERE j.state = 'queued') AS queued,
       count(*) FILTER (WHERE j.state = 'queued' AND j.run_after > now()) AS delayed,
       count(*) FILTER (WHERE j.state = 'running') AS running,
       extract(epoch FROM now() - min(j.created_at) FILTER (WHERE j.state = 'queued'))::float8
           AS oldest_queued_s
FROM dspark.jobs j
WHERE j.state IN ('queued', 'running')
GROUP BY j.owner;
COMMENT ON VIEW dspark.client_status IS 'queued and running jobs by client (owner); dspark_admin only';
REVOKE ALL ON dspark.client_status FROM PUBLIC;
GRANT SELECT ON dspark.client_status TO dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (14, '014-client-turns');
