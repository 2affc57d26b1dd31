-- 006-job-stats-time.sql: the last minute's statistics found without reading them all.
--
-- dsparkd's status (every status_interval, 2 s, on each host; also its
-- watchdog's health check) sums the output tokens of the job_stats rows of the
-- last 60 seconds. job_stats had no index on created_at, so every status read
-- the whole table: about 0.3 s at 5 million rows, against about 1 ms with this
-- index (bench/RESULTS.md). Rows are only inserted, with
-- created_at = now(), so they lie on the heap in time order: a BRIN index
-- finds the last minute's pages from a few summaries and costs an insert
-- almost nothing. (Built in the migration's transaction: inserts into
-- job_stats wait for the build, one pass over the table.)

CREATE INDEX job_stats_created_at_brin ON dspark.job_stats USING brin (created_at);

INSERT INTO dspark.schema_version (version, name) VALUES (6, '006-job-stats-time');
