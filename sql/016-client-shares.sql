-- 016-client-shares.sql: a client's share of the turns.
--
-- The clients with jobs queued take turns (014): one job of each client a
-- turn. An operator may now give a client a larger share: with share k, it
-- takes k jobs a turn, one after another, where the others take one. The
-- rotation that moves the turns' start on by one after each claim (so that
-- claims of one job serve the clients in rotation) now moves it on by one of
-- those places: over a full round of single-job claims, a client with share
-- k starts k jobs for each job of a client with share 1. Shares apply within
-- a priority, like the turns; priorities still come first. A client with no
-- row here has share 1, so without rows nothing changes but this: a
-- priority's turns now count only the clients with jobs of that priority (a
-- client with only jobs of a lower one took places in them, so that claims
-- of one job went more often to the client after it in name order).

CREATE TABLE dspark.client_shares (
    owner name PRIMARY KEY,
    share int NOT NULL CHECK (share BETWEEN 1 AND 100)
);
COMMENT ON TABLE dspark.client_shares IS 'a client''s (owner''s) jobs a turn when the clients take turns at the claims (default 1)';
REVOKE ALL ON dspark.client_shares FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON dspark.client_shares TO dspark_admin;

-- The first p_count claimable jobs of model p_model in turns among the
-- clients p_owners (two or more, in name order), jobs that run alone left
-- out: their ids in claim order (NULL when none). A turn has a place for
-- each job it gives a client: share places for a client (client_shares, 1
-- without a row), together, the clients in name order; only the clients with
-- jobs to claim of the turn's priority count. The turn starts at the place
-- p_first modulo their number (from 0). Each client's first jobs come from jobs_queued_owner_idx,
-- at first enough for p_count / places turns, as many as it takes when every
-- client has jobs of one priority. More are read (twice as many each time)
-- while the list could be wrong: it is short and some client may have more,
-- or a client whose read stopped has a job of a priority or turn that would
-- come before the last one in the list.
CREATE OR REPLACE FUNCTION dspark.claim_turns(p_owners name[], p_model text, p_count int, p_first bigint, OUT ids bigint[])
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_shares int[] := ARRAY(SELECT coalesce(s.share, 1)
                            FROM unnest(p_owners) WITH ORDINALITY AS o(owner, i)
                            LEFT JOIN dspark.client_shares s ON s.owner = o.owner
                            ORDER BY o.i);
    v_turns int := greatest(ceil(p_count::numeric / greatest((SELECT sum(x) FROM unnest(v_shares) x), 1))::int, 1);
    v_sure boolean;
BEGIN
    LOOP
        WITH got AS (   -- each client's first claimable jobs, enough for v_turns turns
            SELECT e.id, e.priority, e.owner, o.i, o.share,
                   -- the job's index among the client's jobs of its priority, from 0
                   row_number() OVER (PARTITION BY e.owner, e.priority ORDER BY e.id) - 1 AS j,
                   -- (a read of p_count jobs is never cut: no more of them fit in the list)
                   count(*) OVER (PARTITION BY e.owner) = v_turns::bigint * o.share
                       AND v_turns::bigint * o.share < p_count AS cut
            FROM unnest(p_owners, v_shares) WITH ORDINALITY AS o(owner, share, i)
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
                LIMIT least(v_turns::bigint * o.share, p_count)) e
        ), places AS (   -- the clients with jobs to claim of each priority: where their places
                         -- start in that priority's turns, of how many
            SELECT c.priority, c.i,
                   sum(c.share) OVER (PARTITION BY c.priority ORDER BY c.i) - c.share AS first,
                   sum(c.share) OVER (PARTITION BY c.priority) AS n
            FROM (SELECT DISTINCT g.priority, g.i, g.share FROM got g) c
        ), read AS (   -- each job's turn, and its place in it after the rotation p_first
            -- (a client's places in a turn go to its jobs in their order: when the
            -- rotation starts within its places, at the offset off, the first of
            -- them after the start comes first)
            SELECT g.id, g.priority, g.owner, g.share, g.cut, g.j / g.share + 1 AS turn,
                   (p.first + CASE WHEN p.off < g.share THEN (p.off + g.j % g.share) % g.share
                                   ELSE g.j % g.share END
                    - p_first % p.n + p.n) % p.n AS place
            FROM got g
            JOIN (SELECT pl.*, (p_first % pl.n - pl.first + pl.n) % pl.n AS off FROM places pl) p
              ON p.priority = g.priority AND p.i = g.i
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
                   GROUP BY r.owner, r.share, last.priority, last.turn, last.n
                   HAVING last.n < p_count
                       -- its next job: of its last job's priority or a lower one; of the
                       -- list's last priority, it comes after the list when its turn does
                       OR min(r.priority) > last.priority
                       OR (min(r.priority) = last.priority
                           AND count(*) FILTER (WHERE r.priority = last.priority) / r.share < last.turn))
        INTO ids, v_sure
        FROM listed l;
        EXIT WHEN ids IS NULL OR v_sure OR v_turns >= p_count;
        v_turns := least(v_turns * 2, p_count);
    END LOOP;
END
$$;

COMMENT ON FUNCTION dspark.claim_jobs IS 'claim queued jobs (SKIP LOCKED) within a token budget, each job costing its estimated prompt, max_tokens and p_job_tokens, none past its expires_at; by priority, then, for one model, the clients with jobs queued take turns (one job each a turn, share jobs for a client with a share in client_shares; the turn''s start moves on by one place a claim); they become running with a lease, returned in claim order; a run_alone job is claimed alone, when first in line by priority and id';

-- Each client's queued and running jobs, and its share of the turns.
CREATE OR REPLACE VIEW dspark.client_status AS
SELECT j.owner AS client,
       count(*) FILTER (WHERE j.state = 'queued') AS queued,
       count(*) FILTER (WHERE j.state = 'queued' AND j.run_after > now()) AS delayed,
       count(*) FILTER (WHERE j.state = 'running') AS running,
       extract(epoch FROM now() - min(j.created_at) FILTER (WHERE j.state = 'queued'))::float8
           AS oldest_queued_s,
       coalesce((SELECT s.share FROM dspark.client_shares s WHERE s.owner = j.owner), 1) AS share
FROM dspark.jobs j
WHERE j.state IN ('queued', 'running')
GROUP BY j.owner;

INSERT INTO dspark.schema_version (version, name) VALUES (16, '016-client-shares');
