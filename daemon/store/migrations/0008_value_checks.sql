-- Bad values never reach the actors (issue 14): CHECK constraints every writer meets
-- (the daemon, jobd.enqueue, an application's own INSERT); jobd.enqueue refuses bad
-- values with a clear message; the limits it cannot read from the TOML; the queues each
-- daemon serves. The ranges match protocol/jobs.py (README: "Limits").

-- Limits the daemons apply, for jobd.enqueue: every daemon writes its own at start
-- (PUT_SETTINGS), so daemons sharing a database should share their [limits].
CREATE TABLE jobd.settings (
    name       text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Written at start and after a reload: lets an enqueue say when no live daemon serves
-- its queue, and a pause refuse a queue nothing serves.
ALTER TABLE jobd.daemons ADD COLUMN queues text[] NOT NULL DEFAULT '{}';

-- Rows written before these constraints that break them (a NaN or 1e308 timeout, an
-- infinite run_at, ...) crash-looped the reaper. Unfinished ones fail, every one has the
-- value normalised and an error entry saying what was wrong; `jobctl retry` runs a
-- failed one again with the normalised value.
WITH bad AS (
    SELECT id, concat_ws('; ',
        CASE WHEN NOT coalesce(timeout_s > 0 AND timeout_s <= 31536000, true)
             THEN 'timeout_s ' || timeout_s || ' is outside (0, 31536000] (dropped)' END,
        CASE WHEN NOT isfinite(run_at) THEN 'run_at ' || run_at || ' is not finite (now)' END,
        CASE WHEN NOT (isfinite(created_at) AND coalesce(isfinite(started_at), true)
                       AND coalesce(isfinite(finished_at), true)
                       AND coalesce(isfinite(lease_until), true))
             THEN 'a timestamp is not finite (now)' END,
        CASE WHEN attempt < 0 OR max_attempts > 10000
             THEN 'attempt ' || attempt || ' / max_attempts ' || max_attempts
                  || ' is out of range' END,
        CASE WHEN cost < 1 THEN 'cost ' || cost || ' is below 1' END,
        CASE WHEN NOT coalesce(progress >= 0 AND progress <= 100, true)
             THEN 'progress ' || progress || ' is outside 0..100 (dropped)' END) AS why
    FROM jobd.jobs
    WHERE NOT coalesce(timeout_s > 0 AND timeout_s <= 31536000, true)
       OR NOT (isfinite(run_at) AND isfinite(created_at) AND coalesce(isfinite(started_at), true)
               AND coalesce(isfinite(finished_at), true) AND coalesce(isfinite(lease_until), true))
       OR attempt < 0 OR max_attempts > 10000 OR cost < 1
       OR NOT coalesce(progress >= 0 AND progress <= 100, true)
)
UPDATE jobd.jobs j SET
    state = CASE WHEN j.state IN ('scheduled', 'available', 'running', 'waiting')
                 THEN 'failed' ELSE j.state END,
    finished_at = CASE WHEN j.state IN ('scheduled', 'available', 'running', 'waiting')
                            OR NOT isfinite(j.finished_at) THEN now() ELSE j.finished_at END,
    -- Fences out an attempt still running on an older daemon.
    lease_token = j.lease_token + 1, lease_owner = NULL, lease_until = NULL,
    timeout_s = CASE WHEN coalesce(j.timeout_s > 0 AND j.timeout_s <= 31536000, true)
                     THEN j.timeout_s END,
    run_at = CASE WHEN isfinite(j.run_at) THEN j.run_at ELSE now() END,
    created_at = CASE WHEN isfinite(j.created_at) THEN j.created_at ELSE now() END,
    started_at = CASE WHEN coalesce(isfinite(j.started_at), true) THEN j.started_at
                      ELSE now() END,
    attempt = greatest(j.attempt, 0),
    max_attempts = least(j.max_attempts, 10000),
    cost = greatest(j.cost, 1),
    progress = CASE WHEN coalesce(j.progress >= 0 AND j.progress <= 100, true)
                    THEN j.progress END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', greatest(j.attempt, 0), 'at', now(), 'class', 'invalid_value',
        'message', 'stored with a value jobd refuses: ' || bad.why))
FROM bad WHERE j.id = bad.id;

-- timeout_s: (0, one year]; NaN fails `<=` and Infinity fails both, as in Python.
ALTER TABLE jobd.jobs ADD CONSTRAINT jobs_timeout_range
    CHECK (timeout_s IS NULL OR (timeout_s > 0 AND timeout_s <= 31536000));
ALTER TABLE jobd.jobs ADD CONSTRAINT jobs_times_finite
    CHECK (isfinite(run_at) AND isfinite(created_at) AND coalesce(isfinite(started_at), true)
           AND coalesce(isfinite(finished_at), true) AND coalesce(isfinite(lease_until), true));
-- The edge allows 1..1000 attempts; `retry` tops max_attempts up past what ran, hence
-- the looser bound here.
ALTER TABLE jobd.jobs ADD CONSTRAINT jobs_attempt_range
    CHECK (attempt >= 0 AND max_attempts <= 10000);
ALTER TABLE jobd.jobs ADD CONSTRAINT jobs_cost_positive CHECK (cost >= 1);
ALTER TABLE jobd.jobs ADD CONSTRAINT jobs_progress_range
    CHECK (progress IS NULL OR (progress >= 0 AND progress <= 100));

-- Schedules: the scheduler does date arithmetic with these. A bad row is paused and
-- normalised (there is no job to fail).
UPDATE jobd.schedules SET
    paused = true,
    every_s = CASE WHEN every_s IS NULL OR (every_s >= 0.001 AND every_s <= 315360000)
                   THEN every_s ELSE 3600 END,
    timeout_s = CASE WHEN coalesce(timeout_s > 0 AND timeout_s <= 31536000, true)
                     THEN timeout_s END,
    max_attempts = CASE WHEN coalesce(max_attempts BETWEEN 1 AND 1000, true)
                        THEN max_attempts END,
    jitter_s = CASE WHEN jitter_s >= 0 AND jitter_s <= 315360000 THEN jitter_s ELSE 0 END,
    grace_s = CASE WHEN grace_s >= 0 AND grace_s <= 315360000 THEN grace_s ELSE 60 END,
    missed_limit = least(greatest(missed_limit, 1), 100000)
WHERE NOT (coalesce(every_s >= 0.001 AND every_s <= 315360000, true)
           AND coalesce(timeout_s > 0 AND timeout_s <= 31536000, true)
           AND coalesce(max_attempts BETWEEN 1 AND 1000, true)
           AND jitter_s >= 0 AND jitter_s <= 315360000
           AND grace_s >= 0 AND grace_s <= 315360000
           AND missed_limit BETWEEN 1 AND 100000);

ALTER TABLE jobd.schedules ADD CONSTRAINT schedules_values CHECK (
    (every_s IS NULL OR (every_s >= 0.001 AND every_s <= 315360000))
    AND (timeout_s IS NULL OR (timeout_s > 0 AND timeout_s <= 31536000))
    AND (max_attempts IS NULL OR max_attempts BETWEEN 1 AND 1000)
    AND jitter_s >= 0 AND jitter_s <= 315360000
    AND grace_s >= 0 AND grace_s <= 315360000
    AND missed_limit BETWEEN 1 AND 100000);

-- Transactional enqueue, now refusing what the daemon refuses, each with a message that
-- names the parameter (SQLSTATE 22023 invalid_parameter_value; 54000 for oversized
-- args). Text limits are the daemon's (protocol/jobs.py); the args limit is read from
-- jobd.settings (default 1 MiB), measured on the JSON text Postgres prints.
-- A queue no live daemon serves is not an error (the daemon may be deploying) but a
-- WARNING, which the application's driver can log.
CREATE OR REPLACE FUNCTION jobd.enqueue(
    kind         text,
    args         jsonb DEFAULT '{}',
    queue        text DEFAULT 'default',
    key          text DEFAULT NULL,
    unique_key   text DEFAULT NULL,
    priority     smallint DEFAULT 0,
    run_at       timestamptz DEFAULT NULL,
    max_attempts integer DEFAULT 3,
    tags         text[] DEFAULT '{}',
    timeout_s    double precision DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id     bigint;
    v_limit    bigint;
    v_bytes    bigint;
    v_live_s   double precision;
BEGIN
    IF kind IS NULL OR char_length(kind) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'jobd.enqueue: kind must be 1 to 200 characters, got %',
            coalesce(char_length(kind)::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF queue IS NULL OR char_length(queue) NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'jobd.enqueue: queue must be 1 to 100 characters, got %',
            coalesce(char_length(queue)::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key IS NOT NULL AND char_length(key) NOT BETWEEN 1 AND 512 THEN
        RAISE EXCEPTION 'jobd.enqueue: key must be 1 to 512 characters, got %', char_length(key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF unique_key IS NOT NULL AND char_length(unique_key) NOT BETWEEN 1 AND 512 THEN
        RAISE EXCEPTION 'jobd.enqueue: unique_key must be 1 to 512 characters, got %',
            char_length(unique_key) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tags IS NULL OR cardinality(tags) > 100
       OR EXISTS (SELECT 1 FROM unnest(tags) t WHERE t IS NULL OR char_length(t) > 256) THEN
        RAISE EXCEPTION 'jobd.enqueue: tags must be at most 100 non-NULL tags of at most 256 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF priority IS NULL THEN
        RAISE EXCEPTION 'jobd.enqueue: priority must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts IS NULL OR max_attempts NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'jobd.enqueue: max_attempts must be 1 to 1000, got %',
            coalesce(max_attempts::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_s IS NOT NULL AND NOT (timeout_s > 0 AND timeout_s <= 31536000) THEN
        RAISE EXCEPTION 'jobd.enqueue: timeout_s must be > 0 and <= 31536000 (one year), got %',
            timeout_s USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF run_at IS NOT NULL AND (NOT isfinite(run_at) OR run_at > now() + interval '3650 days') THEN
        RAISE EXCEPTION 'jobd.enqueue: run_at must be finite and at most 3650 days ahead, got %',
            run_at USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF args IS NULL OR jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'jobd.enqueue: args must be a JSON object, got %',
            coalesce(jsonb_typeof(args), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT (s.value #>> '{}')::bigint INTO v_limit FROM jobd.settings s
    WHERE s.name = 'max_args_bytes';
    v_limit := coalesce(v_limit, 1048576);
    v_bytes := octet_length(args::text);
    IF v_bytes > v_limit THEN
        RAISE EXCEPTION 'jobd.enqueue: args are % bytes of JSON, over the limit of % bytes (limits.max_args_bytes)',
            v_bytes, v_limit USING ERRCODE = 'program_limit_exceeded';
    END IF;

    INSERT INTO jobd.jobs AS j (queue, kind, args, key, unique_key, priority, run_at, state,
                                max_attempts, tags, timeout_s)
    VALUES (queue, kind, args, key, unique_key, priority, coalesce(run_at, now()),
            CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END,
            max_attempts, tags, timeout_s)
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'waiting')
        DO NOTHING
    RETURNING j.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT j.id INTO new_id FROM jobd.jobs j
        WHERE j.unique_key = enqueue.unique_key
          AND j.state IN ('scheduled', 'available', 'running', 'waiting');
    END IF;

    SELECT (s.value #>> '{}')::double precision INTO v_live_s FROM jobd.settings s
    WHERE s.name = 'daemon_live_s';
    IF NOT EXISTS (SELECT 1 FROM jobd.daemons d
                   WHERE enqueue.queue = ANY (d.queues)
                     AND d.heartbeat_at > now() - coalesce(v_live_s, 60) * interval '1 second') THEN
        RAISE WARNING 'jobd.enqueue: no live daemon serves queue %; job % waits until one does',
            enqueue.queue, new_id;
    END IF;
    RETURN new_id;
END $$;
