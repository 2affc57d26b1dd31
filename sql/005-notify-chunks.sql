-- 005-notify-chunks.sql: notification payloads cut in one pass.
--
-- dspark.notify_job_changes (004) cut a long list of entries into payloads by
-- slicing the array once per payload; a slice walks the array from its start
-- (text elements have no fixed width), so a list of n entries cost O(n^2 / k)
-- for k entries per payload: 30 ms for the 25,000 jobs of one statement and
-- 260 ms for 100,000 (bench/RESULTS.md, issue 4). The payloads are now
-- grouped in one pass over the list, with the same rule and order: runs of k
-- entries, k such that k of the longest entry and their commas fit in 7000
-- bytes, sent in list order.

CREATE OR REPLACE FUNCTION dspark.notify_job_changes(p_entries text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    k int;
BEGIN
    IF p_entries IS NULL OR pg_catalog.cardinality(p_entries) = 0 THEN
        RETURN;
    END IF;
    -- (an entry and its comma take at least 8 bytes)
    IF pg_catalog.cardinality(p_entries) <= 7000 / 8 THEN
        payload := pg_catalog.array_to_string(p_entries, ',');
        IF pg_catalog.octet_length(payload) <= 7000 THEN
            PERFORM pg_catalog.pg_notify('dspark_events', payload);
            RETURN;
        END IF;
    END IF;
    SELECT 7000 / (pg_catalog.max(pg_catalog.octet_length(e.entry)) + 1) INTO k
    FROM pg_catalog.unnest(p_entries) AS e(entry);
    k := greatest(k, 1);
    FOR payload IN
        SELECT pg_catalog.string_agg(e.entry, ',' ORDER BY e.i)
        FROM pg_catalog.unnest(p_entries) WITH ORDINALITY AS e(entry, i)
        GROUP BY (e.i - 1) / k
        ORDER BY (e.i - 1) / k
    LOOP
        PERFORM pg_catalog.pg_notify('dspark_events', payload);
    END LOOP;
END
$$;

INSERT INTO dspark.schema_version (version, name) VALUES (5, '005-notify-chunks');
