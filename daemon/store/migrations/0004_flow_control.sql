-- Flow control: per-key concurrency, token buckets (requests and weighted cost), a
-- queue-wide bucket, remote back-pressure (paused_until), adaptive rate and a breaker.
-- All of it lives here so any number of daemons behave as one.

ALTER TABLE jobd.jobs ADD COLUMN cost integer NOT NULL DEFAULT 1;
-- The priority a job was enqueued with; `priority` itself improves as the job ages.
ALTER TABLE jobd.jobs ADD COLUMN base_priority smallint;

CREATE INDEX jobs_claimable_by_key ON jobd.jobs (queue, key, priority, run_at, id)
    WHERE state IN ('available', 'scheduled');
CREATE INDEX jobs_running_by_key ON jobd.jobs (queue, key) WHERE state = 'running';

-- One row per (queue, key) that ever had a job; key '' is the queue itself (its
-- bucket) and also stands for the queue's jobs without a key. Running counts are not
-- stored: they are counted from the jobs table, so a crash can never leave capacity
-- stuck beyond the lease that returns the dead daemon's jobs.
CREATE TABLE jobd.flow_keys (
    queue                text NOT NULL,
    key                  text NOT NULL,
    tokens               double precision,          -- request bucket; NULL = full
    cost_tokens          double precision,          -- tokens-per-minute bucket; NULL = full
    refilled_at          timestamptz,
    paused_until         timestamptz,               -- a 429 / RetryAfter pauses the key
    rate_factor          double precision NOT NULL DEFAULT 1,  -- adaptive (AIMD) multiplier
    consecutive_failures integer NOT NULL DEFAULT 0,
    last_failure_at      timestamptz,
    served_at            timestamptz,               -- round robin: least recently served first
    PRIMARY KEY (queue, key)
);

CREATE OR REPLACE FUNCTION jobd.notify_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobd.flow_keys (queue, key)
    SELECT DISTINCT queue, coalesce(key, '') FROM inserted
    ON CONFLICT DO NOTHING;
    PERFORM pg_notify('jobd_enqueued', q) FROM (SELECT DISTINCT queue AS q FROM inserted) s;
    RETURN NULL;
END $$;

-- Claims up to p_limit jobs of one queue within every limit in p_limits:
--   {"queue_rate": r, "queue_burst": b, "max_keys": n,
--    "default": {"concurrency": c, "rate": r, "burst": b, "tpm": t, "adaptive": bool,
--                "breaker_failures": n, "breaker_cooldown_s": s},
--    "keys": {"<key>": {...overrides}}}
-- Rates are per second. Key rows are locked FOR UPDATE SKIP LOCKED, so two daemons
-- never count the same key's capacity at once; the queue row is locked (waited for).
CREATE FUNCTION jobd.claim_flow(
    p_queue text, p_limit integer, p_owner text, p_lease double precision,
    p_kinds text[], p_paused text[], p_now timestamptz, p_limits jsonb
) RETURNS SETOF jobd.jobs LANGUAGE plpgsql AS $$
DECLARE
    -- clock_timestamp, not now(): a bucket row is read only after its lock is ours, so
    -- the time taken after locking is later than the previous holder's, and each key's
    -- timeline only moves forward across daemons.
    v_now      timestamptz := coalesce(p_now, clock_timestamp());
    v_left     integer := p_limit;
    v_qrate    double precision := (p_limits->>'queue_rate')::double precision;
    v_qburst   double precision;
    v_qtokens  double precision;
    v_qrow     jobd.flow_keys;
    v_keys     jobd.flow_keys[];
    k          jobd.flow_keys;
    lim        jsonb;
    v_share    integer;
    v_take     integer;
    v_conc     integer;
    v_rate     double precision;
    v_burst    double precision;
    v_tpm      double precision;
    v_tokens   double precision;
    v_ctokens  double precision;
    v_elapsed  double precision;
    v_running  integer;
    v_fails    integer;
    v_taken    bigint[];
    v_cost     bigint;
    v_ids      bigint[] := '{}';
BEGIN
    IF v_qrate IS NOT NULL THEN
        INSERT INTO jobd.flow_keys (queue, key) VALUES (p_queue, '') ON CONFLICT DO NOTHING;
        SELECT * INTO v_qrow FROM jobd.flow_keys WHERE queue = p_queue AND key = '' FOR UPDATE;
        v_now := greatest(coalesce(p_now, clock_timestamp()), v_qrow.refilled_at);
        v_qburst := coalesce((p_limits->>'queue_burst')::double precision, greatest(1, v_qrate));
        v_qtokens := least(v_qburst, coalesce(v_qrow.tokens, v_qburst)
            + v_qrate * greatest(0, extract(epoch FROM v_now - coalesce(v_qrow.refilled_at, v_now))));
        v_left := least(v_left, floor(v_qtokens)::integer);
    END IF;

    IF v_left > 0 THEN
        SELECT array_agg(f ORDER BY f.served_at NULLS FIRST, f.key) INTO v_keys FROM (
            SELECT * FROM jobd.flow_keys f
            WHERE f.queue = p_queue
              AND (f.key = '' OR NOT f.key = ANY(p_paused))
              AND (f.paused_until IS NULL OR f.paused_until <= v_now)
            ORDER BY f.served_at NULLS FIRST, f.key
            LIMIT coalesce((p_limits->>'max_keys')::integer, 1000)
            FOR UPDATE SKIP LOCKED
        ) f;
        IF p_now IS NULL THEN
            v_now := greatest(v_now, clock_timestamp());
        END IF;
        -- A fair share per key, so one deep key cannot take a whole batch.
        v_share := greatest(1, ceil(v_left::double precision / greatest(1, coalesce(cardinality(v_keys), 0))));
        FOREACH k IN ARRAY coalesce(v_keys, '{}') LOOP
            EXIT WHEN v_left <= 0;
            lim := coalesce(p_limits->'default', '{}') || coalesce(p_limits->'keys'->k.key, '{}');
            v_take := least(v_left, v_share);
            v_taken := NULL;
            v_elapsed := greatest(0, extract(epoch FROM v_now - coalesce(k.refilled_at, v_now)));
            v_tokens := NULL;
            v_ctokens := NULL;
            IF k.key = '' THEN
                -- Jobs without a key obey only the queue-wide limits.
                SELECT array_agg(id) INTO v_taken FROM (
                    SELECT id FROM jobd.jobs
                    WHERE queue = p_queue AND key IS NULL AND state IN ('available', 'scheduled')
                      AND run_at <= v_now AND kind = ANY(p_kinds)
                    ORDER BY priority, run_at, id LIMIT v_take FOR UPDATE SKIP LOCKED) s;
            ELSE
                v_conc := (lim->>'concurrency')::integer;
                v_fails := (lim->>'breaker_failures')::integer;
                IF v_conc IS NOT NULL OR v_fails IS NOT NULL THEN
                    SELECT count(*) INTO v_running FROM jobd.jobs
                    WHERE queue = p_queue AND key = k.key AND state = 'running';
                END IF;
                IF v_conc IS NOT NULL THEN
                    v_take := least(v_take, v_conc - v_running);
                END IF;
                IF v_fails IS NOT NULL AND k.consecutive_failures >= v_fails THEN
                    -- Open breaker: hold the key for the cool-down, then one probe at a time.
                    IF v_now < k.last_failure_at
                            + make_interval(secs => coalesce((lim->>'breaker_cooldown_s')::double precision, 30))
                       OR v_running > 0 THEN
                        v_take := 0;
                    ELSE
                        v_take := least(v_take, 1);
                    END IF;
                END IF;
                v_rate := (lim->>'rate')::double precision;
                IF v_rate IS NOT NULL THEN
                    IF coalesce((lim->>'adaptive')::boolean, false) THEN
                        v_rate := v_rate * k.rate_factor;
                    END IF;
                    v_burst := coalesce((lim->>'burst')::double precision, greatest(1, v_rate));
                    v_tokens := least(v_burst, coalesce(k.tokens, v_burst) + v_rate * v_elapsed);
                    v_take := least(v_take, floor(v_tokens)::integer);
                END IF;
                v_tpm := (lim->>'tpm')::double precision;
                IF v_tpm IS NOT NULL THEN
                    v_ctokens := least(v_tpm, coalesce(k.cost_tokens, v_tpm) + v_tpm / 60 * v_elapsed);
                    IF v_ctokens <= 0 THEN
                        v_take := 0;
                    END IF;
                END IF;
                IF v_take > 0 THEN
                    -- With a token budget, start jobs whose whole cost fits; a job
                    -- dearer than the full bucket still starts when the bucket is full.
                    SELECT array_agg(id ORDER BY priority, run_at, id) INTO v_taken FROM (
                        SELECT id, priority, run_at, cost,
                               sum(cost) OVER (ORDER BY priority, run_at, id) - cost AS before
                        FROM (SELECT id, priority, run_at, cost FROM jobd.jobs
                              WHERE queue = p_queue AND key = k.key
                                AND state IN ('available', 'scheduled')
                                AND run_at <= v_now AND kind = ANY(p_kinds)
                              ORDER BY priority, run_at, id LIMIT v_take
                              FOR UPDATE SKIP LOCKED) c
                    ) w
                    WHERE v_ctokens IS NULL OR w.before + w.cost <= v_ctokens
                       OR (w.before = 0 AND v_ctokens >= v_tpm);
                END IF;
            END IF;
            v_take := coalesce(cardinality(v_taken), 0);
            IF v_ctokens IS NOT NULL AND v_take > 0 THEN
                SELECT sum(cost) INTO v_cost FROM jobd.jobs WHERE id = ANY(v_taken);
                v_ctokens := v_ctokens - v_cost;
            END IF;
            UPDATE jobd.flow_keys SET
                tokens = CASE WHEN v_tokens IS NULL THEN tokens ELSE v_tokens - v_take END,
                cost_tokens = CASE WHEN v_ctokens IS NULL THEN cost_tokens ELSE v_ctokens END,
                refilled_at = greatest(refilled_at, v_now),
                served_at = CASE WHEN v_take > 0 THEN v_now ELSE served_at END
            WHERE queue = k.queue AND key = k.key;
            v_ids := v_ids || coalesce(v_taken, '{}');
            v_left := v_left - v_take;
        END LOOP;
    END IF;

    IF v_qrate IS NOT NULL THEN
        UPDATE jobd.flow_keys SET tokens = v_qtokens - cardinality(v_ids),
                                  refilled_at = greatest(refilled_at, v_now)
        WHERE queue = p_queue AND key = '';
    END IF;

    RETURN QUERY
    UPDATE jobd.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_token = j.lease_token + 1,
        lease_owner = p_owner, lease_until = v_now + p_lease * interval '1 second',
        started_at = v_now, progress = NULL, progress_note = NULL
    WHERE j.id = ANY(v_ids)
    RETURNING j.*;
END $$;
