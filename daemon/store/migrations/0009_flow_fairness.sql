-- Flow control that scales with the keys that have work (issue 14, items 7 and 8).
--
-- 0004's claim walked the 1,000 least-recently-served rows of jobd.flow_keys and rewrote
-- each one it visited. Rows of finished one-off keys were never bumped or removed, so once
-- a queue had seen 1,000 keys they filled that window and live keys starved; and an empty
-- claim rewrote every row it looked at. Now:
--   * the claim finds its keys from the jobs that are available (jobs_available_by_key),
--     round robin by key from a cursor kept per queue, so its cost follows the keys with
--     work, whatever number of rows flow_keys holds;
--   * it writes a key's row only when it spends that key's tokens, and the queue's row
--     only when it took something: a claim that takes nothing writes nothing;
--   * a key row in its default state (full bucket, no pause, breaker closed, full rate)
--     carries no information, so the reaper deletes it once nothing of that key is
--     available or running and it has been idle a while (PRUNE_IDLE_KEYS); claims and
--     finishes recreate it on demand; served_at now says when the key last took a job;
--   * a rate limit without a stated pause pauses the key for the queue's
--     `rate_limit_pause` (kept here by the claims, read by the finish).

-- Per queue: the queue-wide bucket (it lived on the '' row of flow_keys), the round-robin
-- cursor and the pause for rate limits that do not say how long.
CREATE TABLE jobd.flow_queues (
    queue              text PRIMARY KEY,
    tokens             double precision,          -- queue bucket; NULL = full
    refilled_at        timestamptz,
    next_key           text,                      -- the next claim starts after this key
    rate_limit_pause_s double precision           -- NULL: such a rate limit pauses nothing
);

INSERT INTO jobd.flow_queues (queue, tokens, refilled_at)
SELECT queue, tokens, refilled_at FROM jobd.flow_keys WHERE key = '';

-- The '' row of a queue now means only "this queue has had jobs without a key" (the
-- enqueue trigger inserts it); a claim looks for keyless jobs only where it exists. Rows
-- made by the old queue-bucket code where no keyless job is left go.
DELETE FROM jobd.flow_keys f
WHERE f.key = '' AND NOT EXISTS (
    SELECT 1 FROM jobd.jobs j
    WHERE j.queue = f.queue AND j.key IS NULL
      AND j.state IN ('scheduled', 'available', 'running', 'waiting'));

-- When the key's buckets are full again if nothing is spent (NULL: full now). Written
-- with the tokens, so the reaper can tell an idle row from one still refilling without
-- knowing the limits.
ALTER TABLE jobd.flow_keys ADD COLUMN full_at timestamptz;
UPDATE jobd.flow_keys SET full_at = now() + interval '1 day'
WHERE tokens IS NOT NULL OR cost_tokens IS NOT NULL;

-- The by-key index held scheduled jobs too, so walking it visited every key with only
-- future work (retries, delayed jobs). Split it: available jobs by key, which the claim
-- walks, and scheduled jobs by due time, which the claim promotes once due. A keyed job's
-- row version still has one entry in one of them.
DROP INDEX jobd.jobs_claimable_by_key;
CREATE INDEX jobs_available_by_key ON jobd.jobs (queue, key, priority, run_at, id)
    WHERE state = 'available' AND key IS NOT NULL;
CREATE INDEX jobs_scheduled_by_key ON jobd.jobs (queue, run_at)
    WHERE state = 'scheduled' AND key IS NOT NULL;

-- -- one key's limits, read against its row (NULL row = defaults) --------------------------
-- One expression each, no FROM, so the planner inlines them into the claim's statements.

-- Requests per second the key's bucket refills at (adaptive: times its factor).
CREATE FUNCTION jobd.flow_rate(f jobd.flow_keys, lim jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT (lim->>'rate')::float8
           * CASE WHEN coalesce((lim->>'adaptive')::boolean, false)
                  THEN coalesce(f.rate_factor, 1) ELSE 1 END
$$;

CREATE FUNCTION jobd.flow_burst(f jobd.flow_keys, lim jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN lim->>'rate' IS NOT NULL
                THEN coalesce((lim->>'burst')::float8, greatest(1, jobd.flow_rate(f, lim))) END
$$;

-- Request tokens at `at` (NULL: no rate limit).
CREATE FUNCTION jobd.flow_tokens(f jobd.flow_keys, lim jsonb, at timestamptz)
RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN lim->>'rate' IS NOT NULL THEN
        least(jobd.flow_burst(f, lim),
              coalesce(f.tokens, jobd.flow_burst(f, lim)) + jobd.flow_rate(f, lim)
                  * greatest(0, extract(epoch FROM at - coalesce(f.refilled_at, at))))
    END
$$;

-- Cost tokens (tokens per minute) at `at` (NULL: no such limit).
CREATE FUNCTION jobd.flow_cost_tokens(f jobd.flow_keys, lim jsonb, at timestamptz)
RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN lim->>'tpm' IS NOT NULL THEN
        least((lim->>'tpm')::float8,
              coalesce(f.cost_tokens, (lim->>'tpm')::float8) + (lim->>'tpm')::float8 / 60
                  * greatest(0, extract(epoch FROM at - coalesce(f.refilled_at, at))))
    END
$$;

-- Does the key need its row locked while a claim counts it (two daemons must not
-- both count the same capacity)? Keys with no limit of their own need no lock.
CREATE FUNCTION jobd.flow_limited(lim jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT lim ?| array['concurrency', 'rate', 'tpm', 'breaker_failures']
$$;

-- Has the key failed breaker_failures times in a row (no success since)?
CREATE FUNCTION jobd.flow_breaker_open(f jobd.flow_keys, lim jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT lim->>'breaker_failures' IS NOT NULL
           AND coalesce(f.consecutive_failures, 0) >= (lim->>'breaker_failures')::integer
$$;

-- How many jobs the key may start at `at` by its own limits, `running` of its jobs
-- running now: 0 while paused, while its breaker is open and cooling down (then one
-- probe at a time), or while its buckets are empty.
CREATE FUNCTION jobd.flow_allowance(f jobd.flow_keys, lim jsonb, running bigint,
                                    at timestamptz)
RETURNS integer LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN f.paused_until > at THEN 0
        WHEN jobd.flow_breaker_open(f, lim)
             AND (running > 0 OR at < f.last_failure_at + make_interval(
                  secs => coalesce((lim->>'breaker_cooldown_s')::float8, 30))) THEN 0
        WHEN jobd.flow_cost_tokens(f, lim, at) <= 0 THEN 0
        ELSE greatest(0, least(
            CASE WHEN jobd.flow_breaker_open(f, lim) THEN 1 END,
            (lim->>'concurrency')::bigint - running,
            floor(jobd.flow_tokens(f, lim, at))::bigint,
            1000000000))::integer
    END
$$;

-- -- the claim -----------------------------------------------------------------------

-- Claims up to p_limit jobs of one queue within every limit in p_limits:
--   {"queue_rate": r, "queue_burst": b, "rate_limit_pause_s": s,
--    "default": {"concurrency": c, "rate": r, "burst": b, "tpm": t, "adaptive": bool,
--                "breaker_failures": n, "breaker_cooldown_s": s},
--    "keys": {"<key>": {...overrides}}}
-- Rates are per second.
--
-- Fairness: keys with available jobs are visited in key order from the queue's cursor,
-- wrapping around (jobs without a key take their turn at the wrap), and the first
-- p_limit keys that may start something share the claim evenly. The cursor moves past
-- the keys served, so every key with work is served once per round however many keys
-- there are; within a key jobs go by priority, run_at, id.
--
-- Two daemons: the row of every limited key is locked FOR UPDATE SKIP LOCKED (a key
-- another claim holds is passed over) before its running jobs and tokens are counted in
-- a later statement, whose snapshot sees every claim that held the lock before us.
-- The queue's row is locked (waited for) only when the queue has a queue-wide rate.
CREATE OR REPLACE FUNCTION jobd.claim_flow(
    p_queue text, p_limit integer, p_owner text, p_lease double precision,
    p_kinds text[], p_paused text[], p_now timestamptz, p_limits jsonb
) RETURNS SETOF jobd.jobs LANGUAGE plpgsql AS $$
DECLARE
    -- clock_timestamp, not now(): a bucket row is read only after its lock is ours, so
    -- the time taken after locking is later than the previous holder's, and each key's
    -- timeline only moves forward across daemons.
    v_now      timestamptz := coalesce(p_now, clock_timestamp());
    v_left     integer := p_limit;
    v_def      jsonb := coalesce(p_limits->'default', '{}');
    v_over     jsonb := coalesce(p_limits->'keys', '{}');
    v_qrate    double precision := (p_limits->>'queue_rate')::double precision;
    v_qburst   double precision;
    v_qtokens  double precision;
    v_q        jobd.flow_queues;
    v_keys     text[];
    v_parts    integer[];
    v_missing  text[];
    v_lost     text[];
    v_keyless  boolean := false;
    v_share    integer;
    v_after    integer;  -- how many of v_keys come after the cursor (the rest wrapped)
    v_ids      bigint[];
    v_next     text;
BEGIN
    IF p_limit <= 0 THEN
        RETURN;
    END IF;

    -- Due scheduled jobs with a key become available, so the walk below sees them (the
    -- reaper promotes them too, later); a bounded batch per claim.
    UPDATE jobd.jobs SET state = 'available'
    WHERE id = ANY(ARRAY(
        SELECT id FROM jobd.jobs
        WHERE queue = p_queue AND state = 'scheduled' AND key IS NOT NULL AND run_at <= v_now
        ORDER BY run_at
        LIMIT greatest(1000, 10 * p_limit)
        FOR UPDATE SKIP LOCKED));

    SELECT * INTO v_q FROM jobd.flow_queues WHERE queue = p_queue;
    IF v_qrate IS NOT NULL THEN
        v_qburst := coalesce((p_limits->>'queue_burst')::double precision, greatest(1, v_qrate));
        -- An empty bucket is seen without a lock (it only fills with time).
        IF v_q.refilled_at IS NOT NULL AND floor(least(v_qburst, coalesce(v_q.tokens, v_qburst)
                + v_qrate * greatest(0, extract(epoch FROM v_now - v_q.refilled_at)))) < 1 THEN
            RETURN;
        END IF;
        IF v_q.queue IS NULL THEN
            INSERT INTO jobd.flow_queues (queue) VALUES (p_queue) ON CONFLICT DO NOTHING;
        END IF;
        SELECT * INTO v_q FROM jobd.flow_queues WHERE queue = p_queue FOR UPDATE;
        v_now := greatest(coalesce(p_now, clock_timestamp()), v_q.refilled_at);
        v_qtokens := least(v_qburst, coalesce(v_q.tokens, v_qburst)
            + v_qrate * greatest(0, extract(epoch FROM v_now - coalesce(v_q.refilled_at, v_now))));
        v_left := least(v_left, floor(v_qtokens)::integer);
        IF v_left <= 0 THEN
            RETURN;
        END IF;
    END IF;

    -- The walk: distinct keys with available jobs after the cursor, then from the start
    -- up to it (a loose index scan: one descent per key). Each key is first judged on
    -- an unlocked read; a limited key that may start something is then locked, and
    -- one that another claim holds is passed over. Lazy: it stops at v_left keys.
    SELECT array_agg(c.key ORDER BY c.part, c.key), array_agg(c.part ORDER BY c.part, c.key),
           array_agg(c.key) FILTER (WHERE c.missing)
    INTO v_keys, v_parts, v_missing
    FROM (
        WITH RECURSIVE after_cursor(key) AS (
            (SELECT j.key FROM jobd.jobs j
             WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
               AND j.key > coalesce(v_q.next_key, '')
             ORDER BY j.key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.key FROM jobd.jobs j
                    WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
                      AND j.key > a.key
                    ORDER BY j.key LIMIT 1)
            FROM after_cursor a WHERE a.key IS NOT NULL
        ), before_cursor(key) AS (
            (SELECT j.key FROM jobd.jobs j
             WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
               AND j.key > '' AND j.key <= v_q.next_key
             ORDER BY j.key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.key FROM jobd.jobs j
                    WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
                      AND j.key > b.key AND j.key <= v_q.next_key
                    ORDER BY j.key LIMIT 1)
            FROM before_cursor b WHERE b.key IS NOT NULL
        )
        SELECT o.part, o.key, (o.f).queue IS NULL AND jobd.flow_limited(o.lim) AS missing
        FROM (
            SELECT w.part, w.key, l.lim, fk.f
            FROM (SELECT 1 AS part, key FROM after_cursor WHERE key IS NOT NULL
                  UNION ALL
                  SELECT 2, key FROM before_cursor WHERE key IS NOT NULL) w
            CROSS JOIN LATERAL (SELECT v_def || coalesce(v_over -> w.key, '{}') AS lim) l
            LEFT JOIN LATERAL (SELECT f FROM jobd.flow_keys f
                               WHERE f.queue = p_queue AND f.key = w.key) fk ON true
            -- A column, not an argument: the planner inlines the flow_ functions only
            -- when their arguments are plain values.
            CROSS JOIN LATERAL (
                SELECT CASE WHEN l.lim ?| array['concurrency', 'breaker_failures'] THEN
                           (SELECT count(*) FROM jobd.jobs r
                            WHERE r.queue = p_queue AND r.key = w.key AND r.state = 'running')
                       ELSE 0 END AS n
                OFFSET 0) run
            WHERE NOT w.key = ANY(p_paused)
              AND jobd.flow_allowance(fk.f, l.lim, run.n, v_now) > 0
              AND EXISTS (SELECT 1 FROM jobd.jobs j
                          WHERE j.queue = p_queue AND j.key = w.key AND j.state = 'available'
                            AND j.run_at <= v_now AND j.kind = ANY(p_kinds))
            OFFSET 0  -- a fence: lock only rows that passed the checks above
        ) o
        LEFT JOIN LATERAL (SELECT true AS held FROM jobd.flow_keys x
                           WHERE x.queue = p_queue AND x.key = o.key
                             AND (o.f).queue IS NOT NULL AND jobd.flow_limited(o.lim)
                           FOR UPDATE SKIP LOCKED) lk ON true
        WHERE NOT jobd.flow_limited(o.lim) OR (o.f).queue IS NULL OR lk.held
        LIMIT v_left
    ) c;

    -- A limited key without a row (pruned since, or older than its enqueue trigger) gets
    -- one, in the default state it stands for, and is locked like the others.
    IF v_missing IS NOT NULL THEN
        INSERT INTO jobd.flow_keys (queue, key)
        SELECT p_queue, k FROM unnest(v_missing) k ORDER BY k
        ON CONFLICT DO NOTHING;
        SELECT array_agg(key) INTO v_lost FROM (
            SELECT key FROM jobd.flow_keys WHERE queue = p_queue AND key = ANY(v_missing)
            ORDER BY key FOR UPDATE SKIP LOCKED) s;
        SELECT array_agg(k) INTO v_lost FROM unnest(v_missing) k
        WHERE NOT k = ANY(coalesce(v_lost, '{}'));
        IF v_lost IS NOT NULL THEN
            SELECT array_agg(k ORDER BY p, k), array_agg(p ORDER BY p, k) INTO v_keys, v_parts
            FROM unnest(v_keys, v_parts) AS u(k, p) WHERE NOT k = ANY(v_lost);
        END IF;
    END IF;

    -- Jobs without a key take their turn where the walk wraps around.
    v_after := coalesce(cardinality(array_positions(v_parts, 1)), 0);
    IF v_after < v_left
       AND EXISTS (SELECT 1 FROM jobd.flow_keys WHERE queue = p_queue AND key = '') THEN
        v_keyless := true;
    END IF;

    IF v_keys IS NULL AND NOT v_keyless THEN
        RETURN;
    END IF;
    IF p_now IS NULL THEN
        v_now := greatest(v_now, clock_timestamp());
    END IF;
    v_share := greatest(1, ceil(v_left::double precision
        / (coalesce(cardinality(v_keys), 0) + v_keyless::integer)));

    -- A new statement, so a new snapshot: running counts and buckets are read now that
    -- the locks are ours. Each key takes up to its share and its own allowance; the
    -- claim is then filled round by round (every key's first job, then every key's
    -- second, ...) up to v_left.
    WITH cand AS (
        SELECT k.key, k.ord, l.lim, fk.f,
               jobd.flow_allowance(fk.f, l.lim, run.n, v_now) AS allow,
               jobd.flow_cost_tokens(fk.f, l.lim, v_now) AS ctokens,
               (l.lim->>'tpm')::float8 AS tpm
        FROM unnest(v_keys, v_parts) WITH ORDINALITY AS k(key, part, ord)
        CROSS JOIN LATERAL (SELECT v_def || coalesce(v_over -> k.key, '{}') AS lim) l
        LEFT JOIN LATERAL (SELECT f FROM jobd.flow_keys f
                           WHERE f.queue = p_queue AND f.key = k.key) fk ON true
        CROSS JOIN LATERAL (
            SELECT CASE WHEN l.lim ?| array['concurrency', 'breaker_failures'] THEN
                       (SELECT count(*) FROM jobd.jobs r
                        WHERE r.queue = p_queue AND r.key = k.key AND r.state = 'running')
                   ELSE 0 END AS n
            OFFSET 0) run
    ), keyed AS (
        SELECT c.ord::float8 + CASE WHEN c.ord > v_after THEN 1 ELSE 0 END AS ord,
               t.id, t.cost, t.rn,
               sum(t.cost) OVER (PARTITION BY c.key ORDER BY t.rn) - t.cost AS before,
               c.ctokens, c.tpm
        FROM cand c
        CROSS JOIN LATERAL (
            SELECT s.id, s.cost, row_number() OVER (ORDER BY s.priority, s.run_at, s.id) AS rn
            FROM (SELECT j.id, j.cost, j.priority, j.run_at FROM jobd.jobs j
                  WHERE j.queue = p_queue AND j.key = c.key AND j.state = 'available'
                    AND j.run_at <= v_now AND j.kind = ANY(p_kinds)
                  ORDER BY j.priority, j.run_at, j.id
                  LIMIT least(c.allow, v_share)
                  FOR UPDATE SKIP LOCKED) s
        ) t
        WHERE c.allow > 0
    ), keyless AS (
        -- Jobs without a key obey only the queue-wide limits.
        SELECT v_after + 1::float8 AS ord,
               s.id, 1::integer AS cost, row_number() OVER (ORDER BY s.priority, s.run_at, s.id) AS rn,
               0::bigint AS before, NULL::float8 AS ctokens, NULL::float8 AS tpm
        FROM (SELECT j.id, j.priority, j.run_at FROM jobd.jobs j
              WHERE v_keyless AND j.queue = p_queue AND j.key IS NULL
                AND j.state IN ('available', 'scheduled')
                AND j.run_at <= v_now AND kind = ANY(p_kinds)
              ORDER BY j.priority, j.run_at, j.id
              LIMIT v_share
              FOR UPDATE SKIP LOCKED) s
    )
    SELECT array_agg(p.id) INTO v_ids FROM (
        SELECT id FROM (SELECT * FROM keyed UNION ALL SELECT * FROM keyless) a
        -- With a token budget, start jobs whose whole cost fits; a job dearer than the
        -- full bucket still starts when the bucket is full.
        WHERE a.ctokens IS NULL OR a.before + a.cost <= a.ctokens
           OR (a.before = 0 AND a.ctokens >= a.tpm)
        ORDER BY a.rn, a.ord
        LIMIT v_left
    ) p;

    IF v_ids IS NULL THEN
        RETURN;  -- nothing taken, nothing written
    END IF;

    -- Spend the tokens of the keys that took something and have buckets, and note when
    -- a key was last served (to the minute: a busy key without buckets is not rewritten
    -- by every claim), which tells the reaper an idle key from a busy one.
    UPDATE jobd.flow_keys f SET
        tokens = CASE WHEN s.tokens IS NULL THEN f.tokens ELSE s.tokens - s.n END,
        cost_tokens = CASE WHEN s.ctokens IS NULL THEN f.cost_tokens ELSE s.ctokens - s.cost END,
        refilled_at = CASE WHEN s.tokens IS NULL AND s.ctokens IS NULL THEN f.refilled_at
                           ELSE greatest(f.refilled_at, v_now) END,
        served_at = greatest(f.served_at, v_now),
        full_at = CASE WHEN s.tokens IS NULL AND s.ctokens IS NULL THEN f.full_at
                       ELSE v_now + make_interval(secs => greatest(0,
            (s.burst - (s.tokens - s.n)) / nullif(s.rate, 0),
            (s.tpm - (s.ctokens - s.cost)) / nullif(s.tpm / 60, 0))) END
    FROM (
        SELECT t.key, t.n, t.cost,
               jobd.flow_tokens(k, l.lim, v_now) AS tokens,
               jobd.flow_cost_tokens(k, l.lim, v_now) AS ctokens,
               jobd.flow_burst(k, l.lim) AS burst, jobd.flow_rate(k, l.lim) AS rate,
               (l.lim->>'tpm')::float8 AS tpm
        FROM (SELECT j.key, count(*) AS n, sum(j.cost) AS cost FROM jobd.jobs j
              WHERE j.id = ANY(v_ids) AND j.key IS NOT NULL GROUP BY j.key) t
        JOIN jobd.flow_keys k ON k.queue = p_queue AND k.key = t.key
        CROSS JOIN LATERAL (SELECT v_def || coalesce(v_over -> t.key, '{}') AS lim) l
    ) s
    WHERE f.queue = p_queue AND f.key = s.key
      AND (s.tokens IS NOT NULL OR s.ctokens IS NOT NULL
           OR f.served_at IS NULL OR f.served_at < v_now - interval '1 minute');

    -- The cursor moves to the last key this claim looked at.
    SELECT max(k) FILTER (WHERE p = 2) INTO v_next FROM unnest(v_keys, v_parts) AS u(k, p);
    IF v_next IS NULL THEN
        SELECT max(k) INTO v_next FROM unnest(v_keys, v_parts) AS u(k, p);
        IF v_next IS NULL THEN
            v_next := v_q.next_key;
        END IF;
    END IF;
    INSERT INTO jobd.flow_queues AS q (queue, tokens, refilled_at, next_key, rate_limit_pause_s)
    VALUES (p_queue, v_qtokens - cardinality(v_ids), CASE WHEN v_qrate IS NOT NULL THEN v_now END,
            v_next, (p_limits->>'rate_limit_pause_s')::float8)
    ON CONFLICT (queue) DO UPDATE SET
        tokens = CASE WHEN v_qrate IS NULL THEN q.tokens ELSE EXCLUDED.tokens END,
        refilled_at = CASE WHEN v_qrate IS NULL THEN q.refilled_at
                           ELSE greatest(q.refilled_at, EXCLUDED.refilled_at) END,
        next_key = EXCLUDED.next_key,
        rate_limit_pause_s = EXCLUDED.rate_limit_pause_s;

    RETURN QUERY
    UPDATE jobd.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_token = j.lease_token + 1,
        lease_owner = p_owner, lease_until = v_now + p_lease * interval '1 second',
        started_at = v_now, progress = NULL, progress_note = NULL
    WHERE j.id = ANY(v_ids)
    RETURNING j.*;
END $$;
