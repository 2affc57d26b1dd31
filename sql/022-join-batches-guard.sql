-- 022-join-batches-guard.sql: dspark.join_batches only from the jobs table's
-- triggers, and a batch checked against only by a role that sees it.
--
-- join_batches (004) counts a batch's jobs and checks its custom_ids with its
-- owner's rights; it is granted to clients so that the insert trigger, which
-- runs with the inserting role's rights, can call it. A client could call it
-- directly, for any batch: set another client's counter below zero (its
-- custom_id check then skipped), or to the largest bigint (its inserts then
-- failed), or hold the batch's row lock in an open transaction (its inserts
-- waited). And the trigger ran join_batches before checking that the
-- inserting role sees the batch, so the error told a client whether a
-- custom_id of another client's batch existed, and a missing batch from one
-- that is not its own.
--
-- Now join_batches refuses a call from outside a trigger and counts below 1,
-- and the insert trigger checks first that the inserting role sees each batch:
-- a batch that is missing or another's gives one error, "batch N does not
-- exist (or is not yours)" (SQLSTATE 23503, as the foreign key's).

CREATE OR REPLACE FUNCTION dspark.join_batches(p_ids bigint[], p_added bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n int;
    missing bigint;
    b bigint;
    dup text;
    had_jobs bigint[];
BEGIN
    -- (granted to every role so that the insert trigger, which runs with the inserting role's rights, can call
    -- it; a direct call could change any batch's counter and lock its row)
    IF pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION 'dspark.join_batches is for the triggers of dspark.jobs only'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_added)
       OR EXISTS (SELECT FROM unnest(p_added) AS a(cnt) WHERE a.cnt IS NULL OR a.cnt < 1) THEN
        RAISE EXCEPTION 'dspark.join_batches: one count of at least 1 for each batch'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT count(*) INTO n
    FROM (SELECT bt.id FROM dspark.batches bt WHERE bt.id = ANY (p_ids)
          ORDER BY bt.id FOR NO KEY UPDATE) l;
    IF n < cardinality(p_ids) THEN
        SELECT min(u.id) INTO missing
        FROM unnest(p_ids) AS u(id)
        WHERE NOT EXISTS (SELECT FROM dspark.batches bt WHERE bt.id = u.id);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'insert or update on table "jobs" violates foreign key constraint "jobs_batch_id_fkey"'
                USING ERRCODE = 'foreign_key_violation',
                      DETAIL = format('Key (batch_id)=(%s) is not present in table "batches".', missing),
                      SCHEMA = 'dspark', TABLE = 'jobs', CONSTRAINT = 'jobs_batch_id_fkey';
        END IF;
    END IF;
    WITH counted AS (
        UPDATE dspark.batches bt SET jobs_added = bt.jobs_added + u.added
        FROM unnest(p_ids, p_added) AS u(id, added)
        WHERE bt.id = u.id
        RETURNING bt.id, bt.jobs_added - u.added AS before
    )
    SELECT coalesce(array_agg(c.id), '{}') INTO had_jobs FROM counted c WHERE c.before > 0;
    FOREACH b IN ARRAY had_jobs LOOP
        SELECT c.custom_id INTO dup
        FROM dspark.jobs c
        WHERE c.batch_id = b AND c.custom_id IS NOT NULL
        GROUP BY c.custom_id
        HAVING count(*) > 1
        LIMIT 1;
        IF dup IS NOT NULL THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "jobs_batch_custom_id_key"'
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('Key (batch_id, custom_id)=(%s, %s) already exists.', b, dup),
                      SCHEMA = 'dspark', TABLE = 'jobs', CONSTRAINT = 'jobs_batch_custom_id_key';
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION dspark.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bids bigint[];
    counts bigint[];
    dup record;
    other bigint;
BEGIN
    SELECT pg_catalog.array_agg(b.batch_id ORDER BY b.batch_id),
           pg_catalog.array_agg(b.n ORDER BY b.batch_id)
    INTO bids, counts
    FROM (SELECT n.batch_id, pg_catalog.count(*) AS n FROM new_rows n
          WHERE n.batch_id IS NOT NULL GROUP BY n.batch_id) b;
    IF bids IS NOT NULL THEN
        -- the inserting role must see each batch, before anything is checked against it (its jobs'
        -- custom_ids): a client adds jobs to its own batches only, and learns nothing of the others
        SELECT u.id INTO other FROM pg_catalog.unnest(bids) AS u(id)
        WHERE NOT EXISTS (SELECT FROM dspark.batches b WHERE b.id = u.id) LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'batch % does not exist (or is not yours)', other
                USING ERRCODE = 'foreign_key_violation', SCHEMA = 'dspark', TABLE = 'jobs',
                      CONSTRAINT = 'jobs_batch_id_fkey';
        END IF;
        PERFORM dspark.join_batches(bids, counts);
        SELECT n.batch_id, n.custom_id INTO dup
        FROM new_rows n
        WHERE n.batch_id IS NOT NULL AND n.custom_id IS NOT NULL
        GROUP BY n.batch_id, n.custom_id
        HAVING pg_catalog.count(*) > 1
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "jobs_batch_custom_id_key"'
                USING ERRCODE = 'unique_violation',
                      DETAIL = pg_catalog.format('Key (batch_id, custom_id)=(%s, %s) already exists.',
                                                 dup.batch_id, dup.custom_id),
                      SCHEMA = 'dspark', TABLE = 'jobs', CONSTRAINT = 'jobs_batch_custom_id_key';
        END IF;
    END IF;
    PERFORM dspark.notify_job_changes(ARRAY(
        SELECT dspark.job_change(n.id, n.version, n.state, n.attempt) FROM new_rows n));
    RETURN NULL;
END
$$;

INSERT INTO dspark.schema_version (version, name) VALUES (22, '022-join-batches-guard');
