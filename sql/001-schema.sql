-- 001-schema.sql: the dspark job queue: roles, tables, checks, triggers,
-- row-level security and result views.
--
-- Applied by 'dsparkctl db init' (or psql -1 -f) as a role that may create
-- roles (a superuser, or a role with CREATEROLE that owns the database).
-- The tables belong to that role, which bypasses row-level security and runs
-- the SECURITY DEFINER queue functions of 002-queue.sql.
--
-- Roles (group roles without login; grant them to login roles):
--   dspark_client  submits jobs, reads and cancels only its own (owner = current_user)
--   dspark_worker  dsparkd and dspark-worker: the queue functions of 002, and
--                  job metadata (never prompts or outputs) for event fan-out
--   dspark_admin   everything

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dspark_client') THEN
        CREATE ROLE dspark_client NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dspark_worker') THEN
        CREATE ROLE dspark_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dspark_admin') THEN
        CREATE ROLE dspark_admin NOLOGIN;
    END IF;
END
$$;

CREATE SCHEMA dspark;
COMMENT ON SCHEMA dspark IS 'dspark: LLM generation jobs with DSpark speculative decoding';
REVOKE ALL ON SCHEMA dspark FROM PUBLIC;
GRANT USAGE ON SCHEMA dspark TO dspark_client, dspark_worker, dspark_admin;

CREATE TABLE dspark.schema_version (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    name        text NOT NULL
);
GRANT SELECT ON dspark.schema_version TO PUBLIC;

-- Parameter domains: a bad value is refused at INSERT, and the message names
-- the parameter and the rule, e.g.
--   value for domain dspark.max_tokens violates check constraint "max_tokens_between_1_and_1000000"
CREATE DOMAIN dspark.max_tokens AS int
    CONSTRAINT max_tokens_between_1_and_1000000 CHECK (VALUE BETWEEN 1 AND 1000000);
CREATE DOMAIN dspark.temperature AS float8
    CONSTRAINT temperature_finite_between_0_and_100
    CHECK (VALUE <> 'NaN'::float8 AND VALUE >= 0 AND VALUE <= 100);
CREATE DOMAIN dspark.top_p AS float8
    CONSTRAINT top_p_above_0_at_most_1
    CHECK (VALUE <> 'NaN'::float8 AND VALUE > 0 AND VALUE <= 1);
CREATE DOMAIN dspark.top_k AS int
    CONSTRAINT top_k_at_least_0 CHECK (VALUE >= 0);
CREATE DOMAIN dspark.priority AS int
    CONSTRAINT priority_between_minus_1000_and_1000 CHECK (VALUE BETWEEN -1000 AND 1000);
CREATE DOMAIN dspark.max_attempts AS int
    CONSTRAINT max_attempts_between_1_and_100 CHECK (VALUE BETWEEN 1 AND 100);
-- dspark: scheduled verification (Algorithm 1); dspark-async: the asynchronous
-- scheduler; fixed:N: verify N draft tokens per round; threshold:X: verify the
-- prefix whose predicted confidence stays above X; none: no speculation.
CREATE DOMAIN dspark.spec_mode AS text
    CONSTRAINT spec_mode_dspark_dspark_async_fixed_n_threshold_x_or_none
    CHECK (VALUE IN ('dspark', 'dspark-async', 'none')
           OR VALUE ~ '^(fixed:([1-9]|[1-5][0-9]|6[0-4])|threshold:(0(\.[0-9]{1,6})?|1(\.0{1,6})?))$');
CREATE DOMAIN dspark.job_state AS text
    CONSTRAINT state_queued_running_succeeded_failed_or_cancelled
    CHECK (VALUE IN ('queued', 'running', 'succeeded', 'failed', 'cancelled'));
CREATE DOMAIN dspark.model_name AS text
    CONSTRAINT model_name_1_to_256_bytes CHECK (octet_length(VALUE) BETWEEN 1 AND 256);
CREATE DOMAIN dspark.custom_id AS text
    CONSTRAINT custom_id_1_to_512_bytes CHECK (octet_length(VALUE) BETWEEN 1 AND 512);
CREATE FUNCTION dspark.octet_lengths_between(a text[], lo int, hi int) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT coalesce(pg_catalog.bool_and(pg_catalog.octet_length(s) BETWEEN lo AND hi), true)
    FROM pg_catalog.unnest(a) AS s;
$$;
CREATE DOMAIN dspark.stop_strings AS text[]
    CONSTRAINT stop_at_most_16_strings_of_1_to_256_bytes
    CHECK (cardinality(VALUE) <= 16
           AND dspark.octet_lengths_between(VALUE, 1, 256));

-- Single-column rules are domains rather than table constraints: a domain is
-- checked when a value is stored into the column, while table CHECK
-- constraints run again on every update of the row (claims, heartbeats,
-- write-backs), which would re-scan each prompt many times.
CREATE DOMAIN dspark.prompt_text AS text
    CONSTRAINT prompt_at_most_16mb CHECK (octet_length(VALUE) <= 16777216);
CREATE DOMAIN dspark.chat_messages AS jsonb
    CONSTRAINT messages_array_of_role_content_objects CHECK (
        jsonb_typeof(VALUE) = 'array' AND jsonb_array_length(VALUE) > 0
        AND pg_column_size(VALUE) <= 16777216
        AND NOT jsonb_path_exists(VALUE,
            'lax $[*] ? (@.type() != "object" || !exists(@.role) || !exists(@.content)
                        || @.role.type() != "string" || @.content.type() != "string")'));
CREATE DOMAIN dspark.token_ids AS int[]
    CONSTRAINT prompt_ids_1_to_1000000_non_negative CHECK (
        cardinality(VALUE) BETWEEN 1 AND 1000000
        AND array_position(VALUE, NULL) IS NULL
        AND 0 <= ALL (VALUE));

-- Estimated prompt length in tokens, for admission by KV-cache room before
-- the worker has tokenized (errs on the large side).
CREATE FUNCTION dspark.prompt_tokens_est(prompt text, messages jsonb, prompt_ids int[])
RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN prompt_ids IS NOT NULL THEN pg_catalog.cardinality(prompt_ids)
                WHEN prompt IS NOT NULL THEN pg_catalog.octet_length(prompt) / 3 + 1
                WHEN pg_catalog.jsonb_typeof(messages) = 'array'
                THEN pg_catalog.octet_length(messages::text) / 3
                     + 8 * pg_catalog.jsonb_array_length(messages) + 8
                ELSE 0
           END;
$$;

CREATE TABLE dspark.batches (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner       name NOT NULL DEFAULT current_user,
    created_at  timestamptz NOT NULL DEFAULT now(),
    metadata    jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT metadata_is_an_object CHECK (jsonb_typeof(metadata) = 'object')
);
COMMENT ON TABLE dspark.batches IS 'a group of jobs submitted together (one JSONL file)';

CREATE TABLE dspark.jobs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id        bigint REFERENCES dspark.batches ON DELETE CASCADE,
    custom_id       dspark.custom_id,
    owner           name NOT NULL DEFAULT current_user,
    model           dspark.model_name NOT NULL,
    -- the prompt: exactly one of raw text, chat messages, token ids
    prompt          dspark.prompt_text,
    messages        dspark.chat_messages,
    prompt_ids      dspark.token_ids,
    max_tokens      dspark.max_tokens NOT NULL DEFAULT 1024,
    temperature     dspark.temperature NOT NULL DEFAULT 1.0,
    top_p           dspark.top_p NOT NULL DEFAULT 1.0,
    top_k           dspark.top_k NOT NULL DEFAULT 0,
    seed            bigint,
    stop            dspark.stop_strings,
    spec_mode       dspark.spec_mode NOT NULL DEFAULT 'dspark',
    priority        dspark.priority NOT NULL DEFAULT 0,
    state           dspark.job_state NOT NULL DEFAULT 'queued',
    attempt         int NOT NULL DEFAULT 0,
    max_attempts    dspark.max_attempts NOT NULL DEFAULT 3,
    version         bigint NOT NULL DEFAULT 1,
    run_after       timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    worker_id       text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    output_text     text,
    output_ids      int[],
    finish_reason   text,
    error           text,
    cancel_requested boolean NOT NULL DEFAULT false,
    CONSTRAINT exactly_one_of_prompt_messages_prompt_ids
        CHECK (num_nonnulls(prompt, messages, prompt_ids) = 1)
);
COMMENT ON TABLE dspark.jobs IS 'generation jobs: queued -> running -> succeeded | failed | cancelled';
COMMENT ON COLUMN dspark.jobs.attempt IS 'number of claims so far (0 before the first); write-backs are fenced on it';
COMMENT ON COLUMN dspark.jobs.version IS 'bumped on every update; events carry it';
COMMENT ON COLUMN dspark.jobs.messages IS 'chat messages [{"role","content"}], rendered with the model''s chat format';
COMMENT ON COLUMN dspark.jobs.run_after IS 'the job is not claimed before this time (delayed start)';
COMMENT ON COLUMN dspark.jobs.cancel_requested IS 'set by dspark.cancel_jobs(); a running job stops within one round';

-- Few indexes: a state change is never a HOT update, so each claim, heartbeat
-- and write-back inserts a new entry into every index whose predicate holds.
CREATE INDEX jobs_claim_idx ON dspark.jobs (priority DESC, id) WHERE state = 'queued';
CREATE INDEX jobs_running_lease_idx ON dspark.jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_finished_idx ON dspark.jobs (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
-- the jobs of a batch, and custom_id unique within it (NULL custom_ids allowed)
CREATE UNIQUE INDEX jobs_batch_custom_id_key ON dspark.jobs (batch_id, custom_id)
    WHERE batch_id IS NOT NULL;

-- One row per finished attempt (written by dspark.finish_jobs). Names follow
-- vLLM's speculative-decoding metrics where one exists.
-- (No foreign key to dspark.jobs: its per-row check would lock every job row
-- again in each write-back. finish_jobs writes rows of existing jobs only,
-- and a trigger deletes the statistics of deleted jobs.)
CREATE TABLE dspark.job_stats (
    job_id              bigint NOT NULL,
    attempt             int NOT NULL,
    owner               name NOT NULL,
    worker_id           text,
    device              text,
    model               text,
    draft               text,
    model_checksum      text,
    draft_checksum      text,
    queue_wait_s        float8,
    time_to_first_token_s float8,
    e2e_latency_s       float8,
    decode_tokens_per_s float8,
    prompt_tokens       int,
    output_tokens       int,
    rounds              int,
    num_draft_tokens    bigint,
    num_verified_tokens bigint,
    num_accepted_tokens bigint,
    mean_acceptance_length float8,
    acceptance_by_position int[],
    verified_by_position   int[],
    mean_verify_len     float8,
    finish_reason       text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt)
);
COMMENT ON TABLE dspark.job_stats IS 'per-attempt statistics of finished jobs';
COMMENT ON COLUMN dspark.job_stats.queue_wait_s IS 'from max(created_at, run_after) to the claim';
COMMENT ON COLUMN dspark.job_stats.e2e_latency_s IS 'from created_at to the write-back';
COMMENT ON COLUMN dspark.job_stats.rounds IS 'decoding rounds (draft + verify) after prefill';
COMMENT ON COLUMN dspark.job_stats.num_draft_tokens IS 'draft tokens proposed';
COMMENT ON COLUMN dspark.job_stats.num_verified_tokens IS 'draft tokens scheduled for verification';
COMMENT ON COLUMN dspark.job_stats.num_accepted_tokens IS 'draft tokens accepted';
COMMENT ON COLUMN dspark.job_stats.mean_acceptance_length IS 'tau: tokens committed per round (accepted drafts + 1 bonus)';
COMMENT ON COLUMN dspark.job_stats.acceptance_by_position IS '[k] = rounds in which draft position k+1 was accepted';
COMMENT ON COLUMN dspark.job_stats.verified_by_position IS '[k] = rounds in which draft position k+1 was verified with all earlier positions accepted (so [k]/[k] is the conditional acceptance rate)';
COMMENT ON COLUMN dspark.job_stats.mean_verify_len IS 'mean draft tokens verified per round';

CREATE TABLE dspark.workers (
    worker_id       text PRIMARY KEY,
    host            text,
    pid             int,
    device          text,
    model           text,
    draft           text,
    model_checksum  text,
    draft_checksum  text,
    sps_profile     jsonb,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    state           text NOT NULL DEFAULT 'starting'
        CONSTRAINT worker_state_starting_running_draining_stopped_or_lost
        CHECK (state IN ('starting', 'running', 'draining', 'stopped', 'lost'))
);
COMMENT ON TABLE dspark.workers IS 'GPU workers: identity, step-time profile and liveness';

-- Row trigger: the version, the state machine, cancellation, for every update
-- that does not bump the version itself. The queue functions of 002 bump it
-- (version = version + 1) and keep to the state machine by construction, so
-- the trigger's WHEN clause skips them without calling PL/pgSQL per row;
-- clients (who may update only cancel_requested) and ad-hoc SQL always go
-- through it.
-- (Trigger functions run with the rights of whoever updates, so they carry no
-- SET search_path: that would re-plan them for every row. They name every
-- object with its schema.)
CREATE FUNCTION dspark.jobs_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.cancel_requested AND NOT NEW.cancel_requested THEN
        RAISE EXCEPTION 'cancellation of job % cannot be withdrawn', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    -- a client cancels by setting cancel_requested: a queued job ends at once,
    -- a running one when its worker notices (dspark.heartbeat)
    IF NEW.cancel_requested AND NOT OLD.cancel_requested AND OLD.state = 'queued'
       AND NEW.state = 'queued' THEN
        NEW.state := 'cancelled';
        NEW.finished_at := pg_catalog.now();
        NEW.finish_reason := 'cancelled';
    END IF;
    IF NEW.state IS DISTINCT FROM OLD.state AND NOT (
           (OLD.state = 'queued' AND NEW.state IN ('running', 'cancelled', 'failed'))
        OR (OLD.state = 'running' AND NEW.state IN ('queued', 'succeeded', 'failed', 'cancelled'))) THEN
        RAISE EXCEPTION 'job % cannot go from ''%'' to ''%''', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_before_update BEFORE UPDATE ON dspark.jobs
    FOR EACH ROW WHEN (NEW.version = OLD.version)
    EXECUTE FUNCTION dspark.jobs_before_update();

-- Statement triggers: one NOTIFY per statement on 'dspark_events', payload =
-- the ids of the jobs inserted or whose state changed, split into chunks of
-- about 7000 bytes (the limit is 8000).
CREATE FUNCTION dspark.notify_chunks(ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    FOR payload IN
        SELECT pg_catalog.string_agg(c.id::text, ',' ORDER BY c.id)
        FROM (SELECT u.id,
                     pg_catalog.sum(pg_catalog.length(u.id::text) + 1) OVER (ORDER BY u.id)
                         / 7000 AS chunk
              FROM pg_catalog.unnest(ids) AS u(id)) c
        GROUP BY c.chunk
    LOOP
        PERFORM pg_catalog.pg_notify('dspark_events', payload);
    END LOOP;
END
$$;

CREATE FUNCTION dspark.jobs_after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    SELECT pg_catalog.string_agg(n.id::text, ',') INTO payload
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.state <> o.state;
    IF payload IS NULL THEN
        RETURN NULL;
    ELSIF pg_catalog.length(payload) <= 7000 THEN
        PERFORM pg_catalog.pg_notify('dspark_events', payload);
    ELSE
        PERFORM dspark.notify_chunks(pg_catalog.string_to_array(payload, ',')::bigint[]);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_after_update AFTER UPDATE ON dspark.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dspark.jobs_after_update();

CREATE FUNCTION dspark.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    SELECT pg_catalog.string_agg(n.id::text, ',') INTO payload FROM new_rows n;
    IF payload IS NULL THEN
        RETURN NULL;
    ELSIF pg_catalog.length(payload) <= 7000 THEN
        PERFORM pg_catalog.pg_notify('dspark_events', payload);
    ELSE
        PERFORM dspark.notify_chunks(pg_catalog.string_to_array(payload, ',')::bigint[]);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_after_insert AFTER INSERT ON dspark.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dspark.jobs_after_insert();

-- Statistics go with their job (instead of a foreign key, whose per-row
-- check would lock each job row again in every write-back).
CREATE FUNCTION dspark.jobs_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM dspark.job_stats s USING old_rows o WHERE s.job_id = o.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_after_delete AFTER DELETE ON dspark.jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dspark.jobs_after_delete();

-- Privileges. Clients insert only the request columns (owner, state and the
-- rest take their defaults) and update only cancel_requested.
REVOKE ALL ON dspark.jobs, dspark.job_stats, dspark.batches, dspark.workers FROM PUBLIC;
GRANT SELECT ON dspark.jobs, dspark.job_stats, dspark.batches, dspark.workers TO dspark_client;
GRANT INSERT (batch_id, custom_id, model, prompt, messages, prompt_ids, max_tokens,
              temperature, top_p, top_k, seed, stop, spec_mode, priority, max_attempts,
              run_after)
    ON dspark.jobs TO dspark_client;
GRANT UPDATE (cancel_requested) ON dspark.jobs TO dspark_client;
GRANT INSERT (metadata) ON dspark.batches TO dspark_client;
-- Workers and dsparkd read job metadata for events, never prompts or outputs;
-- they change rows only through the SECURITY DEFINER functions of 002.
GRANT SELECT (id, batch_id, custom_id, owner, model, max_tokens, spec_mode, priority,
              state, attempt, max_attempts, version, run_after, lease_expires_at,
              worker_id, created_at, started_at, finished_at, finish_reason,
              cancel_requested)
    ON dspark.jobs TO dspark_worker;
GRANT SELECT ON dspark.job_stats, dspark.batches, dspark.workers TO dspark_worker;
GRANT ALL ON dspark.jobs, dspark.job_stats, dspark.batches, dspark.workers TO dspark_admin;

ALTER TABLE dspark.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE dspark.job_stats ENABLE ROW LEVEL SECURITY;
ALTER TABLE dspark.batches ENABLE ROW LEVEL SECURITY;
CREATE POLICY client_own ON dspark.jobs TO dspark_client
    USING (owner = current_user) WITH CHECK (owner = current_user);
CREATE POLICY worker_read ON dspark.jobs FOR SELECT TO dspark_worker USING (true);
CREATE POLICY admin_all ON dspark.jobs TO dspark_admin USING (true) WITH CHECK (true);
CREATE POLICY client_own ON dspark.job_stats FOR SELECT TO dspark_client
    USING (owner = current_user);
CREATE POLICY worker_read ON dspark.job_stats FOR SELECT TO dspark_worker USING (true);
CREATE POLICY admin_all ON dspark.job_stats TO dspark_admin USING (true) WITH CHECK (true);
CREATE POLICY client_own ON dspark.batches TO dspark_client
    USING (owner = current_user) WITH CHECK (owner = current_user);
CREATE POLICY worker_read ON dspark.batches FOR SELECT TO dspark_worker USING (true);
CREATE POLICY admin_all ON dspark.batches TO dspark_admin USING (true) WITH CHECK (true);

-- Result views (security_invoker: the reader's row-level security applies).
CREATE VIEW dspark.job_results WITH (security_invoker = true) AS
SELECT j.id, j.batch_id, j.custom_id, j.owner, j.model, j.state, j.attempt,
       j.finish_reason, j.error, j.output_text, j.output_ids,
       j.prompt IS NULL AND j.prompt_ids IS NULL AS chat,
       j.created_at, j.started_at, j.finished_at,
       s.worker_id, s.device, s.draft, s.queue_wait_s, s.time_to_first_token_s,
       s.e2e_latency_s, s.decode_tokens_per_s, s.prompt_tokens, s.output_tokens,
       s.rounds, s.num_draft_tokens, s.num_verified_tokens, s.num_accepted_tokens,
       s.mean_acceptance_length, s.acceptance_by_position, s.verified_by_position,
       s.mean_verify_len
FROM dspark.jobs j
LEFT JOIN dspark.job_stats s ON s.job_id = j.id AND s.attempt = j.attempt;
COMMENT ON VIEW dspark.job_results IS 'each job with the statistics of its final attempt';

CREATE VIEW dspark.batch_progress WITH (security_invoker = true) AS
SELECT b.id AS batch_id, b.owner, b.created_at, b.metadata,
       count(j.id) AS total,
       count(j.id) FILTER (WHERE j.state = 'queued') AS queued,
       count(j.id) FILTER (WHERE j.state = 'running') AS running,
       count(j.id) FILTER (WHERE j.state = 'succeeded') AS succeeded,
       count(j.id) FILTER (WHERE j.state = 'failed') AS failed,
       count(j.id) FILTER (WHERE j.state = 'cancelled') AS cancelled,
       count(j.id) FILTER (WHERE j.state IN ('succeeded', 'failed', 'cancelled')) AS done,
       coalesce(sum(s.output_tokens), 0) AS output_tokens,
       min(j.started_at) AS first_started_at,
       max(j.finished_at) AS last_finished_at
FROM dspark.batches b
LEFT JOIN dspark.jobs j ON j.batch_id = b.id
LEFT JOIN dspark.job_stats s ON s.job_id = j.id AND s.attempt = j.attempt
GROUP BY b.id;
COMMENT ON VIEW dspark.batch_progress IS 'job counts by state and output tokens of each batch';

GRANT SELECT ON dspark.job_results, dspark.batch_progress TO dspark_client, dspark_admin;

INSERT INTO dspark.schema_version (version, name) VALUES (1, '001-schema');
