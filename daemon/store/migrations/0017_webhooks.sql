-- Completion webhooks (README "Webhooks"): the subscriptions the daemons' files declare,
-- and an outbox row per matching finish, written by the finishing statement itself.

-- What a finish is matched against. URLs and secrets are not here: they stay in the
-- files of the daemons that declare the webhook, and only those daemons deliver it.
-- Each daemon writes its own [[webhooks]] at start and on reload; the last to write a
-- name wins its filters (give every daemon the same [[webhooks]]).
CREATE TABLE jobd.webhooks (
    name       text PRIMARY KEY,
    events     text[] NOT NULL,
    kinds      text[] NOT NULL DEFAULT '{}',   -- empty: every kind
    queues     text[] NOT NULL DEFAULT '{}',   -- empty: every queue
    updated_at timestamptz NOT NULL DEFAULT now(),   -- its filters last changed
    declared_at timestamptz NOT NULL DEFAULT now(),  -- a daemon last wrote it
    CONSTRAINT webhooks_events_valid CHECK (
        cardinality(events) >= 1 AND events <@ ARRAY['completed', 'failed', 'cancelled'])
);

-- The webhooks each daemon declares (see jobd.sync_webhooks for when a subscription
-- nobody declares goes).
ALTER TABLE jobd.daemons ADD COLUMN webhooks text[] NOT NULL DEFAULT '{}';

-- state: pending (due at next_attempt_at) | delivered | failed (its retry window ran
-- out; `jobctl webhooks replay` makes it pending again). A claim moves next_attempt_at
-- past the request timeout, so a row whose daemon died mid-request is due again then:
-- next_attempt_at is the lease, and `attempts` fences a late record of a lost attempt.
CREATE TABLE jobd.webhook_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook         text NOT NULL,
    event           text NOT NULL,
    job_id          bigint NOT NULL,
    payload         jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    retry_from      timestamptz NOT NULL DEFAULT now(),  -- the retry window's start (replay resets it)
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    finished_at     timestamptz,
    CONSTRAINT webhook_outbox_state_valid CHECK (state IN ('pending', 'delivered', 'failed'))
);

CREATE INDEX webhook_outbox_due ON jobd.webhook_outbox (webhook, next_attempt_at, id)
    WHERE state = 'pending';
CREATE INDEX webhook_outbox_finished ON jobd.webhook_outbox (webhook, state, finished_at)
    WHERE state <> 'pending';

-- A job that just finished: one outbox row per subscription it matches, in the
-- finishing transaction whatever statement finished it (the completer's batch, a
-- handler's tx.complete, cancel, the reaper's rescue and timeout, a cascaded cancel).
CREATE FUNCTION jobd.webhook_after_finish() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hook text;
BEGIN
    FOR hook IN
        INSERT INTO jobd.webhook_outbox (webhook, event, job_id, payload)
        SELECT w.name, NEW.state, NEW.id, jsonb_build_object(
            'type', 'job.' || NEW.state,
            'timestamp', NEW.finished_at,
            'data', jsonb_build_object(
                'id', NEW.id, 'kind', NEW.kind, 'queue', NEW.queue, 'key', NEW.key,
                'unique_key', NEW.unique_key, 'state', NEW.state, 'attempt', NEW.attempt,
                'max_attempts', NEW.max_attempts, 'tags', to_jsonb(NEW.tags),
                'parent_id', NEW.parent_id,
                'result', CASE WHEN NEW.state = 'completed' THEN NEW.result END,
                'error', CASE WHEN NEW.state <> 'completed' THEN NEW.errors -> -1 END,
                'created_at', NEW.created_at, 'started_at', NEW.started_at,
                'finished_at', NEW.finished_at))
        FROM jobd.webhooks w
        WHERE NEW.state = ANY(w.events)
          AND (w.kinds = '{}' OR NEW.kind = ANY(w.kinds))
          AND (w.queues = '{}' OR NEW.queue = ANY(w.queues))
        RETURNING webhook
    LOOP
        -- Identical notifications collapse within a transaction: one per webhook per batch.
        PERFORM pg_notify('jobd_webhooks', hook);
    END LOOP;
    RETURN NULL;
END $$;

-- Created disabled, and enabled only while a subscription exists (jobd.sync_webhooks):
-- even a trigger that finds no subscription doubles what a finish statement costs
-- Postgres (bench/webhook_trigger_bench.py), and a daemon without webhooks must not pay.
CREATE TRIGGER jobs_webhooks AFTER UPDATE OF state ON jobd.jobs
    FOR EACH ROW WHEN (NEW.state IN ('completed', 'failed', 'cancelled')
                       AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION jobd.webhook_after_finish();
ALTER TABLE jobd.jobs DISABLE TRIGGER jobs_webhooks;

-- One daemon's [[webhooks]] (a JSON array of {name, events, kinds, queues}) written at
-- start, on reload and once a minute: its own subscriptions upserted, and the trigger
-- switched to match. A subscription no registered daemon declares is deleted (its
-- pending rows failed: nobody holds its URL and secret) when this daemon has just
-- dropped it from its file, or once nobody has written it for 10 minutes: a daemon
-- restarting (deregistered, not yet registered again) must not lose its webhooks to
-- another daemon's sync, while a SIGKILLed one's declarations last until it is
-- forgotten anyway.
--
-- Syncs run one at a time (the lock on jobd.webhooks), so "is any subscription left?"
-- is never decided on a stale view. Switching the trigger locks jobd.jobs (SHARE ROW
-- EXCLUSIVE: finishes wait meanwhile) for a moment, only when the answer changes.
-- Turning it on must succeed or the whole sync rolls back (a subscription with the
-- trigger off would miss finishes); turning it off may wait for a later sync.
CREATE FUNCTION jobd.sync_webhooks(daemon text, declared jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wanted boolean;
    enabled boolean;
    dropped text[];
BEGIN
    LOCK TABLE jobd.webhooks IN SHARE ROW EXCLUSIVE MODE;
    SELECT coalesce(array_agg(old.name), '{}') INTO dropped
    FROM jobd.daemons d, unnest(d.webhooks) AS old(name)
    WHERE d.id = daemon
      AND old.name NOT IN (SELECT e ->> 'name' FROM jsonb_array_elements(declared) e);
    UPDATE jobd.daemons SET webhooks = ARRAY(
        SELECT d ->> 'name' FROM jsonb_array_elements(declared) d ORDER BY 1)
    WHERE id = daemon;
    INSERT INTO jobd.webhooks AS w (name, events, kinds, queues)
    SELECT d ->> 'name',
           ARRAY(SELECT jsonb_array_elements_text(d -> 'events')),
           ARRAY(SELECT jsonb_array_elements_text(d -> 'kinds')),
           ARRAY(SELECT jsonb_array_elements_text(d -> 'queues'))
    FROM jsonb_array_elements(declared) d
    ON CONFLICT (name) DO UPDATE
        SET events = excluded.events, kinds = excluded.kinds, queues = excluded.queues,
            declared_at = now(),
            updated_at = CASE WHEN (w.events, w.kinds, w.queues)
                                   IS DISTINCT FROM (excluded.events, excluded.kinds, excluded.queues)
                              THEN now() ELSE w.updated_at END;
    WITH gone AS (
        DELETE FROM jobd.webhooks w
        WHERE NOT EXISTS (SELECT 1 FROM jobd.daemons d WHERE w.name = ANY(d.webhooks))
          AND (w.name = ANY(dropped) OR w.declared_at < now() - interval '10 minutes')
        RETURNING w.name
    )
    UPDATE jobd.webhook_outbox o
    SET state = 'failed', finished_at = now(), next_attempt_at = now(),
        last_error = 'webhook ' || o.webhook || ' is declared by no daemon any more'
    WHERE o.state = 'pending' AND o.webhook IN (SELECT name FROM gone);
    wanted := EXISTS (SELECT 1 FROM jobd.webhooks);
    SELECT t.tgenabled <> 'D' INTO enabled FROM pg_trigger t
    WHERE t.tgrelid = 'jobd.jobs'::regclass AND t.tgname = 'jobs_webhooks';
    IF wanted AND NOT enabled THEN
        PERFORM set_config('lock_timeout', '5s', true);
        ALTER TABLE jobd.jobs ENABLE TRIGGER jobs_webhooks;
    ELSIF enabled AND NOT wanted THEN
        BEGIN
            PERFORM set_config('lock_timeout', '200ms', true);
            ALTER TABLE jobd.jobs DISABLE TRIGGER jobs_webhooks;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- left on (it only costs time); the next sync tries again
        END;
    END IF;
END $$;
