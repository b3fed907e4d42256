-- claim_flow's plans, made safe from the table's statistics (performance issue, "flow
-- control set-based"; README Known limits had "the flow claim's collapse").
--
-- The key walk's descents (`... AND key > $k ORDER BY key LIMIT 1`) have one good path,
-- jobs_available_by_key, which yields the next key in one probe; so have the per-key
-- reads of the claim (a key's jobs by priority). When the statistics were taken while
-- the queue held no available jobs (a table analysed between bursts, then a burst of
-- 20,000 jobs before autoanalyze comes round), the planner believes `queue = $1 AND
-- run_at <= $2` matches about one row, so jobs_claimable (plus a Sort of that "one row"
-- for the walk, a filter on the key for the claim) looks as cheap; each descent then
-- read all of the queue's claimable jobs: 150-290 ms per claim, ~750 jobs/s end to end,
-- until autoanalyze. Now the choice does not rest on the statistics:
--   * sorting is off for the function. Every sort here that can be avoided has an index
--     that gives its order (the walk's and the per-key reads on jobs_available_by_key,
--     the keyless jobs and the promotion on jobs_claimable and jobs_scheduled_by_key); a
--     sort that cannot be avoided still runs, it only costs more in the planner's eyes;
--   * the per-key read orders by (key, priority, run_at, id) over a key range of one
--     value, an order only jobs_available_by_key gives;
--   * sequential scans are off for it too: every read here is a probe of a few rows of
--     big tables, and the statistics of a near-empty table make a scan look cheaper;
--   * jit is off: a disabled sort adds 1e10 to a plan's estimated cost, which passes
--     jit_above_cost, and JIT-compiling the claim took ~1 s on every call. A claim
--     touches a few hundred rows; compiling it never pays.
-- And limits that never bind cost less (see flow_running), and a queue that has had
-- jobs without a key no longer reads its whole keyed backlog per claim to find them
-- (see keyless_none_at). The body is otherwise 0014's.

-- Jobs without a key. A queue's '' row in jobd.flow_keys says it has had some, and a
-- claim then looks for them on jobs_claimable, the one index that holds them, reading
-- past every keyed job ahead of them: 46 ms a claim at 200,000 keyed jobs waiting (9 ms
-- without), for as long as the row stays, which is for ever. An index of keyless jobs
-- would make it a probe and cost plain inserts 15-30 % (100,000-row inserts,
-- measured). Instead a look that finds none is noted on the queue, and claims skip
-- the look until an insert of a keyless job clears the note (the enqueue trigger) or
-- a second has passed: the second bounds the wait of a keyless job that came by an
-- update (a retry, a rescue, a resume) or whose insert raced the note. The trigger
-- locks nothing while no note is set, so keyless enqueues do not queue behind one
-- another or behind a claim; the first after a note clears it.
ALTER TABLE jobd.flow_queues ADD COLUMN keyless_none_at timestamptz;

CREATE OR REPLACE FUNCTION jobd.notify_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobd.flow_keys (queue, key)
    SELECT DISTINCT queue, coalesce(key, '') FROM inserted
    ON CONFLICT DO NOTHING;
    UPDATE jobd.flow_queues f SET keyless_none_at = NULL
    WHERE f.keyless_none_at IS NOT NULL
      AND EXISTS (SELECT 1 FROM inserted i WHERE i.queue = f.queue AND i.key IS NULL);
    PERFORM pg_notify('jobd_enqueued', q) FROM (SELECT DISTINCT queue AS q FROM inserted) s;
    RETURN NULL;
END $$;

-- The running keyed jobs of a queue, counted only up to p_budget rows and returned only
-- when there are at most p_most of them (NULL otherwise). A key's running jobs are a
-- part of them, so when they leave room for the whole claim under a key's concurrency
-- (running + claim <= concurrency) the key's own count cannot change its allowance,
-- and one count of the queue stands for a count per key: limits that never bind then
-- cost one index range of the queue's running jobs per claim, not two probes per key.
CREATE FUNCTION jobd.flow_running(p_queue text, p_most bigint, p_budget bigint)
RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_n bigint;
BEGIN
    IF p_most IS NULL OR p_most < 0 THEN
        RETURN NULL;
    END IF;
    -- count(id): an index scan, for the reason given at the per-key counts below.
    SELECT count(r.id) INTO v_n FROM (
        SELECT r.id FROM jobd.jobs r
        WHERE r.queue = p_queue AND r.state = 'running' AND r.key IS NOT NULL
        LIMIT least(p_most, p_budget) + 1) r;
    RETURN CASE WHEN v_n <= least(p_most, p_budget) THEN v_n END;
END $$;

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
    v_def      jobd.flow_limit := jsonb_populate_record(NULL::jobd.flow_limit,
                                                       coalesce(p_limits->'default', '{}'));
    v_over     jsonb := coalesce(p_limits->'keys', '{}');
    v_qrate    double precision := (p_limits->>'queue_rate')::double precision;
    v_qburst   double precision;
    v_qtokens  double precision;
    v_q        jobd.flow_queues;
    v_keys     text[];
    v_parts    integer[];
    v_missing  text[];
    v_lost     text[];
    v_keyless  boolean;
    v_share    integer;
    v_after    integer;  -- how many of v_keys come after the cursor (the rest wrapped)
    v_cap      bigint := greatest(v_def.concurrency, (
                   SELECT max((o.value->>'concurrency')::bigint) FROM jsonb_each(v_over) o));
    v_running  bigint;   -- the queue's running keyed jobs, when few enough (see flow_running)
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

    -- Up to ten running jobs per job asked: past that, counting only the keys this claim
    -- visits (about two index probes each) is the cheaper way.
    v_running := jobd.flow_running(p_queue, v_cap - v_left, 10 * v_left);

    -- The walk: distinct keys with available jobs after the cursor, then from the start
    -- up to it (a loose index scan: one descent per key). Each descent reads the heap
    -- (it tests kind): an index-only scan never marks the entries of jobs claimed since
    -- the last vacuum dead, and visited each of them again on every claim, at the head
    -- of every key. Each key is first judged on
    -- an unlocked read; a limited key that may start something is then locked, and
    -- one that another claim holds is passed over. Lazy: it stops at v_left keys.
    SELECT array_agg(c.key ORDER BY c.part, c.key), array_agg(c.part ORDER BY c.part, c.key),
           array_agg(c.key) FILTER (WHERE c.missing),
           EXISTS (SELECT 1 FROM jobd.flow_keys WHERE queue = p_queue AND key = '')
               AND (v_q.keyless_none_at IS NULL
                    OR v_q.keyless_none_at < v_now - interval '1 second')
    INTO v_keys, v_parts, v_missing, v_keyless
    FROM (
        WITH RECURSIVE after_cursor(key) AS (
            (SELECT j.key FROM jobd.jobs j
             WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
               AND j.key > coalesce(v_q.next_key, '')
               AND j.run_at <= v_now AND j.kind = ANY(p_kinds)
             ORDER BY j.key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.key FROM jobd.jobs j
                    WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
                      AND j.key > a.key AND j.run_at <= v_now AND j.kind = ANY(p_kinds)
                    ORDER BY j.key LIMIT 1)
            FROM after_cursor a WHERE a.key IS NOT NULL
        ), before_cursor(key) AS (
            (SELECT j.key FROM jobd.jobs j
             WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
               AND j.key > '' AND j.key <= v_q.next_key
               AND j.run_at <= v_now AND j.kind = ANY(p_kinds)
             ORDER BY j.key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.key FROM jobd.jobs j
                    WHERE j.queue = p_queue AND j.state = 'available' AND j.key IS NOT NULL
                      AND j.key > b.key AND j.key <= v_q.next_key
                      AND j.run_at <= v_now AND j.kind = ANY(p_kinds)
                    ORDER BY j.key LIMIT 1)
            FROM before_cursor b WHERE b.key IS NOT NULL
        )
        SELECT o.part, o.key, (o.f).queue IS NULL AND jobd.flow_limited(o.l) AS missing
        FROM (
            SELECT w.part, w.key, l.l, fk.f
            FROM (SELECT 1 AS part, key FROM after_cursor WHERE key IS NOT NULL
                  UNION ALL
                  SELECT 2, key FROM before_cursor WHERE key IS NOT NULL) w
            -- The key's limits: the defaults' row, or it with the key's overrides laid
            -- on top (the JSON leaves unset limits out, so a field an override lacks
            -- keeps the default). OFFSET 0: a column, not an expression, so the helpers
            -- inline and the override is read once.
            CROSS JOIN LATERAL (
                SELECT CASE WHEN v_over ? w.key THEN jsonb_populate_record(v_def, v_over -> w.key)
                            ELSE v_def END AS l
                OFFSET 0) l
            LEFT JOIN LATERAL (SELECT f FROM jobd.flow_keys f
                               WHERE f.queue = p_queue AND f.key = w.key OFFSET 0) fk ON true
            -- count(id), not count(*): id is not in jobs_running_by_key, so this is an
            -- index scan, which marks the entries of finished jobs dead as it meets
            -- them; an index-only scan would visit the heap for each of them every time.
            CROSS JOIN LATERAL (
                SELECT CASE WHEN (l.l).breaker_failures IS NULL
                                 AND v_running + v_left <= (l.l).concurrency THEN v_running
                            WHEN (l.l).concurrency IS NOT NULL
                                 OR (l.l).breaker_failures IS NOT NULL THEN
                           (SELECT count(r.id) FROM jobd.jobs r
                            WHERE r.queue = p_queue AND r.key = w.key AND r.state = 'running')
                       ELSE 0 END AS n
                OFFSET 0) run
            WHERE NOT w.key = ANY(p_paused)
              AND jobd.flow_allowance(fk.f, l.l, run.n, v_now) > 0
            OFFSET 0  -- a fence: lock only rows that passed the checks above
        ) o
        LEFT JOIN LATERAL (SELECT true AS held FROM jobd.flow_keys x
                           WHERE x.queue = p_queue AND x.key = o.key
                             AND (o.f).queue IS NOT NULL AND jobd.flow_limited(o.l)
                           FOR UPDATE SKIP LOCKED) lk ON true
        WHERE NOT jobd.flow_limited(o.l) OR (o.f).queue IS NULL OR lk.held
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
    v_keyless := v_keyless AND v_after < v_left;
    IF v_keys IS NULL AND NOT v_keyless THEN
        RETURN;
    END IF;
    IF p_now IS NULL THEN
        v_now := greatest(v_now, clock_timestamp());
    END IF;
    v_share := greatest(1, ceil(v_left::double precision
        / (coalesce(cardinality(v_keys), 0) + v_keyless::integer)));

    -- Counted again now that the locks are ours: a key we hold starts nothing elsewhere
    -- meanwhile, so its running jobs can only fall below this.
    v_running := jobd.flow_running(p_queue, v_cap - v_left, 10 * v_left);

    -- The claim, one statement (a new snapshot: running counts and buckets are read now
    -- that the locks are ours). Each key takes up to its share and its own allowance;
    -- the claim is then filled round by round (every key's first job, then every key's
    -- second, ...) up to v_left. Only keys that yielded a job have their row written.
    RETURN QUERY
    WITH cand AS (
        SELECT k.key, k.ord, l.l, fk.f,
               jobd.flow_allowance(fk.f, l.l, run.n, v_now) AS allow,
               jobd.flow_tokens(fk.f, l.l, v_now) AS tokens,
               jobd.flow_cost_tokens(fk.f, l.l, v_now) AS ctokens
        FROM unnest(v_keys, v_parts) WITH ORDINALITY AS k(key, part, ord)
        CROSS JOIN LATERAL (
            SELECT CASE WHEN v_over ? k.key THEN jsonb_populate_record(v_def, v_over -> k.key)
                        ELSE v_def END AS l
            OFFSET 0) l
        LEFT JOIN LATERAL (SELECT f FROM jobd.flow_keys f
                           WHERE f.queue = p_queue AND f.key = k.key OFFSET 0) fk ON true
        CROSS JOIN LATERAL (
            SELECT CASE WHEN (l.l).breaker_failures IS NULL
                             AND v_running + v_left <= (l.l).concurrency THEN v_running
                        WHEN (l.l).concurrency IS NOT NULL
                             OR (l.l).breaker_failures IS NOT NULL THEN
                       (SELECT count(r.id) FROM jobd.jobs r
                        WHERE r.queue = p_queue AND r.key = k.key AND r.state = 'running')
                   ELSE 0 END AS n
            OFFSET 0) run
    ), keyed AS (
        SELECT c.key, c.ord::float8 + CASE WHEN c.ord > v_after THEN 1 ELSE 0 END AS ord,
               t.id, t.cost, t.rn,
               sum(t.cost) OVER (PARTITION BY c.key ORDER BY t.rn) - t.cost AS before,
               c.ctokens, (c.l).tpm AS tpm
        FROM cand c
        CROSS JOIN LATERAL (
            SELECT s.id, s.cost, row_number() OVER (ORDER BY s.priority, s.run_at, s.id) AS rn
            FROM (SELECT j.id, j.cost, j.priority, j.run_at FROM jobd.jobs j
                  -- A range, not key = c.key: with an equality the key drops out of
                  -- the ORDER BY and jobs_claimable could serve it too (this migration's head).
                  WHERE j.queue = p_queue AND j.key >= c.key AND j.key <= c.key
                    AND j.state = 'available' AND j.run_at <= v_now AND j.kind = ANY(p_kinds)
                  ORDER BY j.key, j.priority, j.run_at, j.id
                  LIMIT least(c.allow, v_share)
                  FOR UPDATE SKIP LOCKED) s
        ) t
        WHERE c.allow > 0
    ), keyless AS (
        -- Jobs without a key obey only the queue-wide limits.
        SELECT NULL::text AS key, v_after + 1::float8 AS ord,
               s.id, 1::integer AS cost, row_number() OVER (ORDER BY s.priority, s.run_at, s.id) AS rn,
               0::bigint AS before, NULL::float8 AS ctokens, NULL::float8 AS tpm
        FROM (SELECT j.id, j.priority, j.run_at FROM jobd.jobs j
              WHERE v_keyless AND j.queue = p_queue AND j.key IS NULL
                AND j.state IN ('available', 'scheduled')
                AND j.run_at <= v_now AND kind = ANY(p_kinds)
              ORDER BY j.priority, j.run_at, j.id
              LIMIT v_share
              FOR UPDATE SKIP LOCKED) s
    ), picked AS (
        SELECT a.id, a.key, a.cost FROM (SELECT * FROM keyed UNION ALL SELECT * FROM keyless) a
        -- With a token budget, start jobs whose whole cost fits; a job dearer than the
        -- full bucket still starts when the bucket is full.
        WHERE a.ctokens IS NULL OR a.before + a.cost <= a.ctokens
           OR (a.before = 0 AND a.ctokens >= a.tpm)
        ORDER BY a.rn, a.ord
        LIMIT v_left
    ), spent AS (
        -- The keys that took something and have buckets spend their tokens; each notes
        -- when it was last served (to the minute: a busy key without buckets is not
        -- rewritten by every claim), which tells the reaper an idle key from a busy one.
        UPDATE jobd.flow_keys f SET
            tokens = CASE WHEN s.tokens IS NULL THEN f.tokens ELSE s.tokens - s.n END,
            cost_tokens = CASE WHEN s.ctokens IS NULL THEN f.cost_tokens
                               ELSE s.ctokens - s.cost END,
            refilled_at = CASE WHEN s.tokens IS NULL AND s.ctokens IS NULL THEN f.refilled_at
                               ELSE greatest(f.refilled_at, v_now) END,
            served_at = greatest(f.served_at, v_now),
            full_at = CASE WHEN s.tokens IS NULL AND s.ctokens IS NULL THEN f.full_at
                           ELSE v_now + make_interval(secs => greatest(0,
                (s.burst - (s.tokens - s.n)) / nullif(s.rate, 0),
                (s.tpm - (s.ctokens - s.cost)) / nullif(s.tpm / 60, 0))) END
        FROM (
            SELECT t.key, t.n, t.cost, c.tokens, c.ctokens, (c.l).tpm AS tpm,
                   jobd.flow_burst(c.f, c.l) AS burst, jobd.flow_rate(c.f, c.l) AS rate
            FROM (SELECT p.key, count(*) AS n, sum(p.cost) AS cost FROM picked p
                  WHERE p.key IS NOT NULL GROUP BY p.key) t
            JOIN cand c ON c.key = t.key
        ) s
        WHERE f.queue = p_queue AND f.key = s.key
          AND (s.tokens IS NOT NULL OR s.ctokens IS NOT NULL
               OR f.served_at IS NULL OR f.served_at < v_now - interval '1 minute')
    ), moved AS (
        -- The cursor moves to the last key this claim looked at.
        -- A look for jobs without a key that found none is noted (keyless_none_at).
        INSERT INTO jobd.flow_queues AS q (queue, tokens, refilled_at, next_key,
                                           rate_limit_pause_s, keyless_none_at)
        SELECT p_queue, v_qtokens - n.taken, CASE WHEN v_qrate IS NOT NULL THEN v_now END,
               coalesce((SELECT coalesce(max(u.k) FILTER (WHERE u.p = 2), max(u.k))
                         FROM unnest(v_keys, v_parts) AS u(k, p)), v_q.next_key),
               (p_limits->>'rate_limit_pause_s')::float8,
               CASE WHEN v_keyless AND NOT EXISTS (SELECT 1 FROM keyless) THEN v_now END
        FROM (SELECT count(*) AS taken FROM picked) n
        WHERE n.taken > 0
        ON CONFLICT (queue) DO UPDATE SET
            tokens = CASE WHEN v_qrate IS NULL THEN q.tokens ELSE EXCLUDED.tokens END,
            refilled_at = CASE WHEN v_qrate IS NULL THEN q.refilled_at
                               ELSE greatest(q.refilled_at, EXCLUDED.refilled_at) END,
            next_key = EXCLUDED.next_key,
            rate_limit_pause_s = EXCLUDED.rate_limit_pause_s,
            keyless_none_at = CASE WHEN v_keyless THEN EXCLUDED.keyless_none_at
                                   ELSE q.keyless_none_at END
    )
    UPDATE jobd.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_token = j.lease_token + 1,
        lease_owner = p_owner, lease_until = v_now + p_lease * interval '1 second',
        started_at = v_now, progress = NULL, progress_note = NULL
    WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING j.*;
END $$;

-- CREATE OR REPLACE dropped 0014's setting; see there for plan_cache_mode.
ALTER FUNCTION jobd.claim_flow(text, integer, text, double precision, text[], text[],
                               timestamptz, jsonb)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION jobd.claim_flow(text, integer, text, double precision, text[], text[],
                               timestamptz, jsonb)
    SET enable_sort = off;
ALTER FUNCTION jobd.claim_flow(text, integer, text, double precision, text[], text[],
                               timestamptz, jsonb)
    SET jit = off;
ALTER FUNCTION jobd.claim_flow(text, integer, text, double precision, text[], text[],
                               timestamptz, jsonb)
    SET enable_seqscan = off;
