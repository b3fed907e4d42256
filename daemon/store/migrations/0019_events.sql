-- Events start functions (README: "Events and flow control"). An event is sent with
-- jobd.send_event, from the daemon (socket, HTTP, jobctl, the client) or from an
-- application's own transaction; in that one transaction it is stored, starts one job
-- per subscribed kind (through jobd.enqueue, so every rule of job insertion applies),
-- cancels the jobs whose cancel_on it matches and wakes the workflows waiting for it.
-- Subscriptions are in Postgres because a send from SQL cannot ask a daemon.

-- The idempotency key a sender gave, and the jobs the event started (for `jobctl events
-- list`; kept on the event so the jobs table needs no index for it).
ALTER TABLE jobd.events
    ADD COLUMN idempotency_key text,
    ADD COLUMN jobs bigint[] NOT NULL DEFAULT '{}';
CREATE INDEX events_recent ON jobd.events (id DESC) INCLUDE (name);

-- The event that started a job (`jobctl get`); NULL for every other job, and no index,
-- so the enqueue path pays nothing for it.
ALTER TABLE jobd.jobs ADD COLUMN event_id bigint;

-- An idempotency key is accepted once per window (settings.event_dedup_s, default 24 h):
-- a repeat inside it returns the first event's id and starts nothing. The primary key
-- is what makes this hold across daemons: a concurrent duplicate waits on the first
-- sender's row until that transaction ends, then sees it (or, if it rolled back, takes
-- the key itself).
CREATE TABLE jobd.event_keys (
    key        text PRIMARY KEY,
    event_id   bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX event_keys_expiry ON jobd.event_keys (expires_at);

-- One row per (event, kind, action): action 'start' creates a job of `kind` with the
-- event's data as its args when the data contains `match`; 'cancel' cancels the
-- unfinished jobs of `kind` whose args equal the event's data on every field of
-- `fields` (queued ones in the kind's declared `queue`). The job options are the kind's declaration, copied at sync; key_path is the
-- kind's key as a path into the data (a Python key function cannot run here).
-- Each daemon writes what its handlers declare at start and after a reload
-- (SYNC_SUBSCRIPTIONS): the last writer's definition holds, and a row goes only when a
-- daemon that runs the kind (or last declared it) no longer declares it and no other
-- live daemon does. A kind no live daemon runs keeps its rows: events sent during a
-- deploy still start its jobs, which wait for a daemon like any enqueue.
CREATE TABLE jobd.event_subscriptions (
    event        text NOT NULL,
    kind         text NOT NULL,
    action       text NOT NULL,
    match        jsonb NOT NULL DEFAULT '{}',
    fields       text[] NOT NULL DEFAULT '{}',
    queue        text NOT NULL DEFAULT 'default',
    priority     smallint NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 3,
    timeout_s    double precision,
    key_path     text[],
    daemon_id    text NOT NULL,
    declared_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event, kind, action),
    CONSTRAINT event_subscriptions_action CHECK (action IN ('start', 'cancel')),
    CONSTRAINT event_subscriptions_match CHECK (jsonb_typeof(match) = 'object'),
    CONSTRAINT event_subscriptions_fields CHECK (action <> 'cancel' OR cardinality(fields) >= 1)
);

-- What each daemon declares, as [[event, kind, action], ...]: lets a sync tell whether
-- another live daemon still declares a row it would remove.
ALTER TABLE jobd.daemons ADD COLUMN subscriptions jsonb NOT NULL DEFAULT '[]';

-- jobd.send_event(name, data, id): the one way an event is sent. `id` is the sender's
-- idempotency key. Returns the event's id (the first one's, for a repeat), whether it
-- was created, the jobs it started (and their kinds), the jobs it cancelled and the
-- waiting workflows it woke. Refuses what the daemon refuses, naming the parameter:
-- SQLSTATE 22023, or 54000 for data over limits.max_args_bytes.
CREATE FUNCTION jobd.send_event(
    name text,
    data jsonb DEFAULT '{}',
    id   text DEFAULT NULL,
    OUT event_id bigint,
    OUT created boolean,
    OUT started bigint[],
    OUT started_kinds text[],
    OUT cancelled bigint[],
    OUT woken bigint[]
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_limit  bigint;
    v_bytes  bigint;
    v_window double precision;
    v_id     bigint;
    v_job    bigint;
    v_tagged bigint;
    v_ids    bigint[];
    sub      record;
BEGIN
    IF send_event.name IS NULL OR send_event.name !~ '^[A-Za-z0-9_.:/@-]{1,200}$' THEN
        RAISE EXCEPTION 'jobd.send_event: name must be 1 to 200 characters of A-Z a-z 0-9 _ . : / @ -, got %',
            coalesce(quote_literal(left(send_event.name, 50)), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF send_event.data IS NULL OR jsonb_typeof(send_event.data) <> 'object' THEN
        RAISE EXCEPTION 'jobd.send_event: data must be a JSON object, got %',
            coalesce(jsonb_typeof(send_event.data), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF send_event.id IS NOT NULL AND char_length(send_event.id) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'jobd.send_event: id must be 1 to 256 characters, got %',
            char_length(send_event.id) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT (s.value #>> '{}')::bigint INTO v_limit FROM jobd.settings s
    WHERE s.name = 'max_args_bytes';
    v_limit := coalesce(v_limit, 1048576);
    v_bytes := octet_length(send_event.data::text);
    IF v_bytes > v_limit THEN
        RAISE EXCEPTION 'jobd.send_event: data is % bytes of JSON, over the limit of % bytes (limits.max_args_bytes)',
            v_bytes, v_limit USING ERRCODE = 'program_limit_exceeded';
    END IF;

    v_id := nextval(pg_get_serial_sequence('jobd.events', 'id'));
    IF send_event.id IS NOT NULL THEN
        SELECT (s.value #>> '{}')::double precision INTO v_window FROM jobd.settings s
        WHERE s.name = 'event_dedup_s';
        -- An expired key is taken over in place (the same row lock orders it against a
        -- concurrent sender); a live one is left alone and answers the repeat.
        INSERT INTO jobd.event_keys AS k (key, event_id, expires_at)
        VALUES (send_event.id, v_id, now() + coalesce(v_window, 86400) * interval '1 second')
        ON CONFLICT (key) DO UPDATE SET event_id = EXCLUDED.event_id, expires_at = EXCLUDED.expires_at
            WHERE k.expires_at <= now()
        RETURNING k.event_id INTO v_tagged;
        IF v_tagged IS NULL THEN
            SELECT k.event_id INTO event_id FROM jobd.event_keys k WHERE k.key = send_event.id;
            created := false;
            started := '{}';
            started_kinds := '{}';
            cancelled := '{}';
            woken := '{}';
            RETURN;
        END IF;
    END IF;
    event_id := v_id;
    created := true;
    started := '{}';
    started_kinds := '{}';
    cancelled := '{}';

    -- Cancels first: an event that both cancels and starts a kind replaces its jobs.
    FOR sub IN
        SELECT s.kind, s.queue, s.fields,
               (SELECT jsonb_object_agg(u.f, send_event.data -> u.f)
                FROM unnest(s.fields) AS u(f)) AS args
        FROM jobd.event_subscriptions s
        WHERE s.event = send_event.name AND s.action = 'cancel' AND send_event.data ?& s.fields
        ORDER BY s.kind
    LOOP
        -- Read through the partial indexes of unfinished jobs (the queue's claimable
        -- ones, the running ones, the waiting ones): never the retained finished jobs,
        -- and no index by kind (0007 dropped it: it cost every claim). Queued jobs are
        -- looked for in the kind's declared queue.
        WITH candidates AS (
            SELECT j.id FROM jobd.jobs j
            WHERE j.queue = sub.queue AND j.state IN ('available', 'scheduled')
              AND j.kind = sub.kind AND j.args @> sub.args
            UNION ALL
            SELECT j.id FROM jobd.jobs j
            WHERE j.state = 'running' AND j.kind = sub.kind AND j.args @> sub.args
            UNION ALL
            SELECT j.id FROM jobd.jobs j
            WHERE j.state = 'waiting' AND j.kind = sub.kind AND j.args @> sub.args
        ), target AS (
            SELECT j.id, j.state FROM jobd.jobs j
            WHERE j.id IN (SELECT id FROM candidates)
              AND j.state IN ('scheduled', 'available', 'running', 'waiting')
            ORDER BY j.id
            FOR UPDATE
        ), queued AS (
            UPDATE jobd.jobs j SET state = 'cancelled', finished_at = now()
            FROM target t WHERE j.id = t.id AND t.state <> 'running'
            RETURNING j.id
        ), running AS (
            UPDATE jobd.jobs j SET cancel_requested = true
            FROM target t WHERE j.id = t.id AND t.state = 'running'
            RETURNING j.id, pg_notify('jobd_cancel', j.id::text)
        )
        SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}') INTO v_ids
        FROM (SELECT id FROM queued UNION ALL SELECT id FROM running) x;
        cancelled := cancelled || v_ids;
    END LOOP;

    FOR sub IN
        SELECT s.kind, s.queue, s.priority, s.max_attempts, s.timeout_s, s.key_path
        FROM jobd.event_subscriptions s
        WHERE s.event = send_event.name AND s.action = 'start' AND send_event.data @> s.match
        ORDER BY s.kind
    LOOP
        v_job := jobd.enqueue(sub.kind, send_event.data, queue => sub.queue,
                              key => send_event.data #>> sub.key_path,
                              priority => sub.priority, max_attempts => sub.max_attempts,
                              timeout_s => sub.timeout_s);
        -- jobd.enqueue may answer with a job that already existed (a unique key, a
        -- flow-control rule): only a job created here is this event's.
        UPDATE jobd.jobs j SET event_id = v_id
        WHERE j.id = v_job AND j.event_id IS NULL AND j.created_at = now()
          AND NOT (j.id = ANY (started))
        RETURNING j.id INTO v_tagged;
        IF v_tagged IS NOT NULL THEN
            started := started || v_tagged;
            started_kinds := started_kinds || sub.kind;
        END IF;
    END LOOP;

    INSERT INTO jobd.events (id, name, data, idempotency_key, jobs)
    VALUES (v_id, send_event.name, send_event.data, send_event.id, started);

    WITH w AS (
        UPDATE jobd.jobs j SET state = 'available', run_at = now()
        WHERE j.state = 'waiting' AND j.waiting_on ->> 'type' = 'event'
          AND j.waiting_on ->> 'name' = send_event.name
          AND send_event.data @> coalesce(j.waiting_on -> 'match', '{}'::jsonb)
        RETURNING j.id, pg_notify('jobd_enqueued', j.queue)
    )
    SELECT coalesce(array_agg(w.id ORDER BY w.id), '{}') INTO woken FROM w;
END $$;

-- Many events in one call, sent in order (a repeat of a key earlier in the batch
-- answers as a repeat; a cancel after a start in the batch cancels it). The batch's
-- idempotency keys are first locked in sorted order, so two batches that share keys,
-- listed in different orders, wait for each other instead of deadlocking on the keys'
-- rows. One row per event, in order (n = its position, from 1).
CREATE FUNCTION jobd.send_events(names text[], datas jsonb[], ids text[] DEFAULT NULL)
RETURNS TABLE (n bigint, event_id bigint, created boolean, started bigint[],
               started_kinds text[], cancelled bigint[], woken bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
BEGIN
    IF cardinality(names) IS DISTINCT FROM cardinality(datas)
       OR (ids IS NOT NULL AND cardinality(ids) <> cardinality(names)) THEN
        RAISE EXCEPTION 'jobd.send_events: names, datas and ids must be arrays of one length'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF ids IS NOT NULL THEN
        -- 0x6a6f6264 = 'jobd': a namespace of its own among the application's locks.
        PERFORM pg_advisory_xact_lock(1785684580, hashtext(k))
        FROM (SELECT DISTINCT k FROM unnest(ids) AS u(k) WHERE k IS NOT NULL ORDER BY k) s;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(names), 0) LOOP
        n := i;
        SELECT s.event_id, s.created, s.started, s.started_kinds, s.cancelled, s.woken
        INTO event_id, created, started, started_kinds, cancelled, woken
        FROM jobd.send_event(names[i], datas[i], ids[i]) s;
        RETURN NEXT;
    END LOOP;
END $$;
