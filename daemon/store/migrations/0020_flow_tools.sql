-- Flow-control tools declared on a handler (README "Flow-control tools"): debounce,
-- batching, throttle, singleton and unique-key windows. They hold across every daemon
-- and every way a job is created because the insertion itself applies them, here: the
-- daemon's enqueue statement sends the rows of kinds listed in jobd.kind_tools to
-- jobd.enqueue_tools, and jobd.enqueue (SQL, events) looks the kind up itself. Kinds not
-- listed never reach this code: their insert is the plain statement, unchanged.

-- One row per kind that declares a tool, written by every daemon that has the handler,
-- at start and on reload (its @job declaration with the config's [kinds.<kind>]
-- overrides applied); the last writer wins, so daemons sharing a database should share
-- their handler code and [kinds]. A *_field names the args field whose value is the key
-- (NULL: one key for the whole kind); a key computed by a Python function travels with
-- the row instead (enqueue_tools' `tool_keys`), and a SQL enqueue falls back to the field.
CREATE TABLE jobd.kind_tools (
    kind             text PRIMARY KEY,
    debounce_s       double precision,
    debounce_max_s   double precision,
    debounce_field   text,
    batch_size       integer,
    batch_timeout_s  double precision,
    batch_field      text,
    throttle_per_s   double precision,
    throttle_burst   integer,
    throttle_mode    text,
    throttle_field   text,
    singleton_mode   text,
    singleton_field  text,
    unique_for_s     double precision,
    unique_mode      text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT kind_tools_values CHECK (
        (debounce_s IS NULL OR (debounce_s > 0 AND debounce_s <= 31536000))
        AND (debounce_max_s IS NULL OR (debounce_s IS NOT NULL AND debounce_max_s >= debounce_s
                                        AND debounce_max_s <= 31536000))
        AND (batch_size IS NULL OR batch_size BETWEEN 1 AND 10000)
        AND ((batch_size IS NULL) = (batch_timeout_s IS NULL))
        AND (batch_timeout_s IS NULL OR (batch_timeout_s > 0 AND batch_timeout_s <= 31536000))
        AND NOT (batch_size IS NOT NULL AND debounce_s IS NOT NULL)
        AND (throttle_per_s IS NULL OR (throttle_per_s > 0 AND throttle_per_s <= 1e6))
        AND (throttle_burst IS NULL OR throttle_burst BETWEEN 1 AND 1000000)
        AND ((throttle_per_s IS NULL) = (throttle_mode IS NULL))
        AND (throttle_mode IS NULL OR throttle_mode IN ('delay', 'drop'))
        AND (singleton_mode IS NULL OR singleton_mode IN ('skip', 'cancel'))
        AND (unique_for_s IS NULL OR (unique_for_s > 0 AND unique_for_s <= 315360000))
        AND (unique_mode IS NULL OR unique_mode IN ('keep', 'replace')))
);

-- `skipped`: an enqueue a throttle (mode drop) or a singleton (mode skip) refused. The
-- row is kept, finished at once, so `list`/`get` show what was dropped and why.
ALTER TABLE jobd.jobs DROP CONSTRAINT jobs_state_valid;
ALTER TABLE jobd.jobs ADD CONSTRAINT jobs_state_valid CHECK (state IN
    ('scheduled', 'available', 'running', 'waiting', 'completed', 'failed', 'cancelled',
     'skipped'));
CREATE INDEX jobs_skipped ON jobd.jobs (state, finished_at) WHERE state = 'skipped';

-- tool_key: the debounce, batch or singleton key of a job of a kind with that tool.
-- tool_until: a pending debounce's latest run time (debounce_max), or an open batch's
-- deadline (NULL once the batch is sealed). tool_count: an open batch's item count (NULL
-- for every job that is not a batch). Plain jobs leave all three NULL, so the partial
-- index below holds none of them and costs their insert one predicate test.
-- tool_bytes: an open batch's item JSON so far, so a sealed batch's args stay within
-- limits.max_args_bytes (an item that does not fit opens the next batch).
ALTER TABLE jobd.jobs ADD COLUMN tool_key text, ADD COLUMN tool_until timestamptz,
    ADD COLUMN tool_count integer, ADD COLUMN tool_bytes integer;
CREATE INDEX jobs_tool_key ON jobd.jobs (kind, tool_key)
    WHERE tool_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'waiting');

-- unique_for finds a finished holder of a key through jobs_unique_key_any (0002), which
-- indexes every row with a unique key: no new index, so finishes cost nothing more.

-- Throttle buckets as GCRA: `tat` is the key's theoretical arrival time; an arrival at t
-- conforms when t >= tat - (burst - 1) / rate, and moves tat on by 1 / rate.
CREATE TABLE jobd.throttle_keys (
    kind text NOT NULL,
    key  text NOT NULL,
    tat  timestamptz NOT NULL,
    PRIMARY KEY (kind, key)
);

-- An open batch's items, until the batch job leaves `scheduled`/`available` (claimed,
-- cancelled): then jobd.seal_batch moves them into the job's args in that same
-- statement and deletes them. Each item belongs to one job, and arrivals and the seal
-- both hold the job's row lock, so a batch is never split or duplicated.
CREATE TABLE jobd.batch_items (
    job_id bigint NOT NULL,
    id     bigserial,
    args   jsonb NOT NULL,
    PRIMARY KEY (job_id, id)
);

CREATE FUNCTION jobd.seal_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT jsonb_build_object('items', coalesce(jsonb_agg(i.args ORDER BY i.id), '[]'::jsonb))
    INTO NEW.args FROM jobd.batch_items i WHERE i.job_id = NEW.id;
    DELETE FROM jobd.batch_items i WHERE i.job_id = NEW.id;
    NEW.tool_until := NULL;
    RETURN NEW;
END $$;

-- The WHEN clause is evaluated without calling the function, so claims of other jobs
-- pay one NULL test.
CREATE TRIGGER jobs_seal_batch BEFORE UPDATE OF state ON jobd.jobs
    FOR EACH ROW WHEN (OLD.tool_count IS NOT NULL AND OLD.tool_until IS NOT NULL
                       AND NEW.state NOT IN ('scheduled', 'available'))
    EXECUTE FUNCTION jobd.seal_batch();

-- Singleton mode cancel parks the new job as `waiting` on the ones it cancelled (a
-- `children` wait, so the reaper's safety net wakes it too); when one of them finishes,
-- wake the parked jobs of its key whose wait now holds.
CREATE FUNCTION jobd.singleton_after_finish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobd_enqueued', w.queue) FROM jobd.jobs w
    WHERE w.kind = NEW.kind AND w.tool_key = NEW.tool_key AND w.state = 'waiting'
      AND w.waiting_on ->> 'type' = 'children';
    UPDATE jobd.jobs w SET state = 'available', run_at = now()
    WHERE w.kind = NEW.kind AND w.tool_key = NEW.tool_key AND w.state = 'waiting'
      AND w.waiting_on ->> 'type' = 'children' AND jobd.wait_satisfied(w.waiting_on);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_singleton_after_finish AFTER UPDATE OF state ON jobd.jobs
    FOR EACH ROW WHEN (OLD.tool_key IS NOT NULL AND OLD.state = 'running'
                       AND NEW.state IN ('completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION jobd.singleton_after_finish();

-- The rows of kinds with tools, from every enqueue path. $p_rows: a JSON array of
-- actors.ports.NewJob (sql/common.job_rows) plus `tool_keys`, an object of the keys a
-- handler's functions computed ({"debounce": "k", ...}). Returns one row per input row:
-- the job that stands for it, whether this call created a job that will run (a
-- `skipped` row is stored but says false), and what happened: created | debounced | replaced | batched | duplicate | skipped_throttle |
-- skipped_singleton. p_now pins the clock (tests); NULL is the database's.
CREATE FUNCTION jobd.enqueue_tools(p_rows json, p_parent bigint DEFAULT NULL,
                                   p_now timestamptz DEFAULT NULL)
RETURNS TABLE (ord bigint, id bigint, created boolean, outcome text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_t       timestamptz := coalesce(p_now, now());
    r         record;
    s         jobd.kind_tools%ROWTYPE;
    v_args    jsonb;
    v_keys    jsonb;
    v_key     text;
    v_id      bigint;
    v_state   text;
    v_attempt integer;
    v_kind    text;
    v_count   integer;
    v_run_at  timestamptz;
    v_tat     timestamptz;
    v_tau     double precision;
    v_ids     bigint[];
    v_tool    text;
    v_until   timestamptz;
    v_wait    jsonb;
    v_limit   bigint;
    v_bytes   bigint;
BEGIN
    -- Every key lock of the batch first, in one order: two statements never wait on
    -- each other crosswise. Transaction-scoped, so a caller's own transaction holds
    -- them until it commits.
    PERFORM pg_advisory_xact_lock(l.h) FROM (
        -- A unique key is one across kinds (the unique index), the others per kind.
        SELECT DISTINCT hashtextextended(CASE WHEN t.tool = 'unique'
            THEN 'unique' || chr(31) || x.unique_key
            ELSE x.kind || chr(31) || t.tool || chr(31) || coalesce(
                x.tool_keys ->> t.tool, x.args::jsonb ->> t.field, '') END, 0) AS h
        FROM json_to_recordset(p_rows) AS x(kind text, args text, unique_key text,
                                            tool_keys jsonb)
        JOIN jobd.kind_tools k ON k.kind = x.kind
        CROSS JOIN LATERAL (VALUES
            ('debounce', k.debounce_field, k.debounce_s IS NOT NULL),
            ('batch', k.batch_field, k.batch_size IS NOT NULL),
            ('throttle', k.throttle_field, k.throttle_mode IS NOT NULL),
            ('singleton', k.singleton_field, k.singleton_mode IS NOT NULL),
            ('unique', NULL, x.unique_key IS NOT NULL)) AS t(tool, field, used)
        WHERE t.used
        ORDER BY 1) l;

    FOR r IN
        SELECT * FROM ROWS FROM (json_to_recordset(p_rows) AS (
            queue text, kind text, args text, key text, unique_key text, priority int,
            delay_s float8, max_attempts int, tags text[], timeout_s float8, cost int,
            traceparent text, tool_keys jsonb)) WITH ORDINALITY AS x(
            queue, kind, args, key, unique_key, priority, delay_s, max_attempts, tags,
            timeout_s, cost, traceparent, tool_keys, n)
        ORDER BY n
    LOOP
        ord := r.n;
        v_args := r.args::jsonb;
        v_keys := coalesce(r.tool_keys, '{}'::jsonb);
        v_run_at := v_t + coalesce(r.delay_s, 0) * interval '1 second';
        v_tool := NULL; v_until := NULL; v_wait := NULL; v_id := NULL; v_ids := NULL;
        SELECT * INTO s FROM jobd.kind_tools k WHERE k.kind = r.kind;

        -- Unique keys: an unfinished holder stands for the enqueue (unique_mode replace:
        -- a queued holder of this kind takes the new args); with unique_for a job
        -- finished within the window does too.
        IF r.unique_key IS NOT NULL THEN
            SELECT j.id, j.state, j.attempt, j.kind INTO v_id, v_state, v_attempt, v_kind
            FROM jobd.jobs j
            WHERE j.unique_key = r.unique_key
              AND j.state IN ('scheduled', 'available', 'running', 'waiting')
            FOR UPDATE;
            IF v_id IS NULL AND s.unique_for_s IS NOT NULL THEN
                SELECT j.id, j.state, j.attempt, j.kind INTO v_id, v_state, v_attempt, v_kind
                FROM jobd.jobs j
                WHERE j.unique_key = r.unique_key
                  AND j.state IN ('completed', 'failed', 'cancelled')
                  AND j.finished_at > v_t - s.unique_for_s * interval '1 second'
                ORDER BY j.finished_at DESC LIMIT 1;
            END IF;
            IF v_id IS NOT NULL THEN
                id := v_id; created := false; outcome := 'duplicate';
                IF s.unique_mode = 'replace' AND v_kind = r.kind AND v_attempt = 0
                   AND v_state IN ('scheduled', 'available') THEN
                    UPDATE jobd.jobs j SET args = v_args WHERE j.id = v_id;
                    outcome := 'replaced';
                END IF;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        -- Debounce: the pending run of the key (not yet started) takes the new args and
        -- moves to `debounce` from now, but never past `debounce_max` from its first.
        IF s.debounce_s IS NOT NULL THEN
            v_key := coalesce(v_keys ->> 'debounce', v_args ->> s.debounce_field, '');
            UPDATE jobd.jobs j SET
                args = v_args, traceparent = coalesce(r.traceparent, j.traceparent),
                run_at = least(greatest(v_run_at, v_t + s.debounce_s * interval '1 second'),
                               j.tool_until),
                state = CASE WHEN least(greatest(v_run_at, v_t + s.debounce_s * interval '1 second'),
                                        j.tool_until) > v_t THEN 'scheduled' ELSE 'available' END
            WHERE j.id = (SELECT p.id FROM jobd.jobs p
                          WHERE p.kind = r.kind AND p.tool_key = v_key
                            AND p.state IN ('scheduled', 'available') AND p.attempt = 0
                          ORDER BY p.id DESC LIMIT 1)
            RETURNING j.id INTO v_id;
            IF v_id IS NOT NULL THEN
                id := v_id; created := false; outcome := 'debounced';
                RETURN NEXT;
                CONTINUE;
            END IF;
            v_tool := v_key;
            v_until := v_t + s.debounce_max_s * interval '1 second';
            v_run_at := greatest(v_run_at, v_t + s.debounce_s * interval '1 second');
        END IF;

        -- Throttle: counts the runs it admits, so an enqueue a debounce folded into a
        -- pending run (above) took no token.
        IF s.throttle_mode IS NOT NULL THEN
            v_key := coalesce(v_keys ->> 'throttle', v_args ->> s.throttle_field, '');
            v_tau := (coalesce(s.throttle_burst, 1) - 1) / s.throttle_per_s;
            INSERT INTO jobd.throttle_keys AS b (kind, key, tat) VALUES (r.kind, v_key, v_t)
            ON CONFLICT (kind, key) DO UPDATE SET tat = b.tat
            RETURNING greatest(b.tat, v_t) INTO v_tat;
            IF s.throttle_mode = 'drop' AND v_tat - v_tau * interval '1 second' > v_t THEN
                INSERT INTO jobd.jobs AS j (queue, kind, args, key, priority, state,
                                            max_attempts, tags, timeout_s, cost, parent_id,
                                            traceparent, finished_at, errors)
                VALUES (r.queue, r.kind, v_args, r.key, r.priority, 'skipped',
                        r.max_attempts, coalesce(r.tags, '{}'), r.timeout_s,
                        coalesce(r.cost, 1), p_parent, r.traceparent, v_t, jsonb_build_array(jsonb_build_object(
                            'attempt', 0, 'at', v_t, 'class', 'skipped',
                            'message', format('throttle %s/s (burst %s) of key %L: over the limit, dropped',
                                              s.throttle_per_s, coalesce(s.throttle_burst, 1), v_key))))
                RETURNING j.id INTO id;
                created := false; outcome := 'skipped_throttle';
                RETURN NEXT;
                CONTINUE;
            END IF;
            IF s.throttle_mode = 'delay' THEN
                v_run_at := greatest(v_run_at, v_tat - v_tau * interval '1 second');
            END IF;
            UPDATE jobd.throttle_keys b
            -- delay: the bucket runs on the times it hands out; drop: on arrivals.
            SET tat = CASE WHEN s.throttle_mode = 'delay' THEN greatest(v_tat, v_run_at)
                           ELSE v_tat END + (1 / s.throttle_per_s) * interval '1 second'
            WHERE b.kind = r.kind AND b.key = v_key;
        END IF;

        -- Singleton.
        IF s.singleton_mode IS NOT NULL THEN
            v_key := coalesce(v_keys ->> 'singleton', v_args ->> s.singleton_field, '');
            v_tool := v_key;
            IF s.singleton_mode = 'skip' THEN
                SELECT j.id INTO v_id FROM jobd.jobs j
                WHERE j.kind = r.kind AND j.tool_key = v_key
                  AND j.state IN ('scheduled', 'available', 'running', 'waiting')
                LIMIT 1;
                IF v_id IS NOT NULL THEN
                    INSERT INTO jobd.jobs AS j (queue, kind, args, key, priority, state,
                                                max_attempts, tags, timeout_s, cost, parent_id,
                                                traceparent, finished_at, errors)
                    VALUES (r.queue, r.kind, v_args, r.key, r.priority, 'skipped',
                            r.max_attempts, coalesce(r.tags, '{}'), r.timeout_s,
                            coalesce(r.cost, 1), p_parent, r.traceparent, v_t, jsonb_build_array(jsonb_build_object(
                                'attempt', 0, 'at', v_t, 'class', 'skipped',
                                'message', format('singleton key %L is held by job %s', v_key, v_id))))
                    RETURNING j.id INTO id;
                    created := false; outcome := 'skipped_singleton';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
            ELSE
                -- cancel: queued holders go now, running ones through the cancel path
                -- (the worker stops the attempt; a rescue of it ends it `cancelled`),
                -- and the new job waits until they are gone.
                UPDATE jobd.jobs j SET state = 'cancelled', finished_at = now()
                WHERE j.kind = r.kind AND j.tool_key = v_key
                  AND j.state IN ('scheduled', 'available', 'waiting');
                -- Locking them (the UPDATE) makes their finish wait for this commit, so
                -- its trigger sees the parked job and wakes it.
                WITH running AS (
                    UPDATE jobd.jobs j SET cancel_requested = true
                    WHERE j.kind = r.kind AND j.tool_key = v_key AND j.state = 'running'
                    RETURNING j.id, pg_notify('jobd_cancel', j.id::text)
                )
                SELECT array_agg(running.id ORDER BY running.id) INTO v_ids FROM running;
                IF v_ids IS NOT NULL THEN
                    v_wait := jsonb_build_object('type', 'children', 'ids', to_jsonb(v_ids),
                                                 'singleton', v_key);
                END IF;
            END IF;
        END IF;

        -- Batching: the item joins the key's open batch (its row locked, so a claim
        -- cannot seal it meanwhile), or opens one due at the timeout.
        IF s.batch_size IS NOT NULL THEN
            v_key := coalesce(v_keys ->> 'batch', v_args ->> s.batch_field, '');
            IF v_limit IS NULL THEN
                SELECT (x.value #>> '{}')::bigint INTO v_limit FROM jobd.settings x
                WHERE x.name = 'max_args_bytes';
                v_limit := coalesce(v_limit, 1048576);
            END IF;
            v_bytes := octet_length(r.args) + 2;  -- the item and its separator
            SELECT j.id INTO v_id FROM jobd.jobs j
            WHERE j.kind = r.kind AND j.tool_key = v_key
              AND j.state IN ('scheduled', 'available') AND j.tool_until IS NOT NULL
              AND j.tool_count < s.batch_size
              AND (j.tool_count = 0 OR j.tool_bytes + v_bytes <= v_limit - 16)
            ORDER BY j.id LIMIT 1
            FOR UPDATE;
            created := false;
            IF v_id IS NULL THEN
                -- The batch's trace context is its first item's.
                INSERT INTO jobd.jobs AS j (queue, kind, args, key, priority, run_at, state,
                                            max_attempts, tags, timeout_s, cost, parent_id,
                                            traceparent, tool_key, tool_until, tool_count,
                                            tool_bytes)
                VALUES (r.queue, r.kind, '{"items": []}', r.key, r.priority,
                        v_t + s.batch_timeout_s * interval '1 second', 'scheduled',
                        r.max_attempts, coalesce(r.tags, '{}'), r.timeout_s, coalesce(r.cost, 1),
                        p_parent, r.traceparent, v_key,
                        v_t + s.batch_timeout_s * interval '1 second', 0, 0)
                RETURNING j.id INTO v_id;
                created := true;
            END IF;
            INSERT INTO jobd.batch_items (job_id, args) VALUES (v_id, v_args);
            UPDATE jobd.jobs j SET tool_count = j.tool_count + 1,
                tool_bytes = j.tool_bytes + v_bytes,
                run_at = CASE WHEN j.tool_count + 1 >= s.batch_size THEN v_t ELSE j.run_at END,
                state = CASE WHEN j.tool_count + 1 >= s.batch_size THEN 'available' ELSE j.state END
            WHERE j.id = v_id
            RETURNING j.tool_count INTO v_count;
            IF v_count >= s.batch_size THEN
                PERFORM pg_notify('jobd_enqueued', r.queue);
            END IF;
            id := v_id; outcome := 'batched';
            RETURN NEXT;
            CONTINUE;
        END IF;

        INSERT INTO jobd.jobs AS j (queue, kind, args, key, unique_key, priority, run_at, state,
                                    max_attempts, tags, timeout_s, cost, parent_id, traceparent,
                                    tool_key, tool_until, waiting_on)
        VALUES (r.queue, r.kind, v_args, r.key, r.unique_key, r.priority, v_run_at,
                CASE WHEN v_wait IS NOT NULL THEN 'waiting'
                     WHEN v_run_at > v_t THEN 'scheduled' ELSE 'available' END,
                r.max_attempts, coalesce(r.tags, '{}'), r.timeout_s, coalesce(r.cost, 1),
                p_parent, r.traceparent, v_tool, v_until, v_wait)
        ON CONFLICT (unique_key)
            WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'waiting')
            DO NOTHING
        RETURNING j.id INTO id;
        created := id IS NOT NULL; outcome := 'created';
        IF id IS NULL THEN  -- a holder of another kind committed since the lookup
            SELECT j.id INTO id FROM jobd.jobs j
            WHERE j.unique_key = r.unique_key
              AND j.state IN ('scheduled', 'available', 'running', 'waiting');
            outcome := 'duplicate';
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- jobd.enqueue as in 0018 (same signature, so this replaces it), plus: a kind listed in
-- jobd.kind_tools goes through jobd.enqueue_tools (keys from the kind's *_field settings).
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

    IF EXISTS (SELECT 1 FROM jobd.kind_tools t WHERE t.kind = enqueue.kind) THEN
        SELECT t.id INTO new_id FROM jobd.enqueue_tools(json_build_array(json_build_object(
            'queue', queue, 'kind', kind, 'args', args::text, 'key', key,
            'unique_key', unique_key, 'priority', priority,
            'delay_s', CASE WHEN run_at > now()
                            THEN extract(epoch FROM run_at - now())::float8 END,
            'max_attempts', max_attempts, 'tags', tags, 'timeout_s', timeout_s,
            'traceparent', traceparent))) t;
    ELSE
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
