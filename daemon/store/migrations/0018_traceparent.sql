-- The producer's W3C trace context, stored with its job: the parent of the job's attempt
-- spans when tracing is on (README: "Tracing"). Nullable and without a default, so
-- adding it rewrites nothing; NULL for every job enqueued without one.
ALTER TABLE jobd.jobs ADD COLUMN traceparent text;

-- The one pattern (protocol.jobs.TRACEPARENT_PATTERN): version 00, lower-case hex,
-- neither the trace id nor the span id all zeros.
CREATE FUNCTION jobd.traceparent_pattern() RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT '^00-(?!0{32}-)[0-9a-f]{32}-(?!0{16}-)[0-9a-f]{16}-[0-9a-f]{2}$'::text
$$;

-- NOT VALID: the column was just added, every row holds NULL, so there is nothing to
-- check; new and updated rows are checked all the same (a direct INSERT gets 23514).
ALTER TABLE jobd.jobs ADD CONSTRAINT jobs_traceparent_format
    CHECK (traceparent ~ jobd.traceparent_pattern()) NOT VALID;

-- jobd.enqueue(..., traceparent => ...): a new parameter is a new signature, so the old
-- function goes (CREATE OR REPLACE would add an overload, and a call naming only the old
-- parameters would then be ambiguous). The body is 0008's, plus the traceparent.
DROP FUNCTION jobd.enqueue(text, jsonb, text, text, text, smallint, timestamptz, integer,
                           text[], double precision);

CREATE FUNCTION jobd.enqueue(
    kind         text,
    args         jsonb DEFAULT '{}',
    queue        text DEFAULT 'default',
    key          text DEFAULT NULL,
    unique_key   text DEFAULT NULL,
    priority     smallint DEFAULT 0,
    run_at       timestamptz DEFAULT NULL,
    max_attempts integer DEFAULT 3,
    tags         text[] DEFAULT '{}',
    timeout_s    double precision DEFAULT NULL,
    traceparent  text DEFAULT NULL
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
    IF traceparent IS NOT NULL AND traceparent !~ jobd.traceparent_pattern() THEN
        RAISE EXCEPTION 'jobd.enqueue: traceparent must be a W3C trace context (00-<32 hex>-<16 hex>-<2 hex>, lower case, ids not all zeros), got %',
            left(traceparent, 100) USING ERRCODE = 'invalid_parameter_value';
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
                                max_attempts, tags, timeout_s, traceparent)
    VALUES (queue, kind, args, key, unique_key, priority, coalesce(run_at, now()),
            CASE WHEN run_at > now() THEN 'scheduled' ELSE 'available' END,
            max_attempts, tags, timeout_s, traceparent)
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
