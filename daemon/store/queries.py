"""Every SQL statement jobd runs, by name.

Time-sensitive statements read `coalesce($n::timestamptz, now())`: production passes
NULL so all daemons share the database's clock; tests pass a pinned time.
JSON travels as text and is cast in SQL, so msgspec does all encoding on our side.
"""

from __future__ import annotations

import msgspec

from actors.ports import NewJob

UNFINISHED = "('scheduled', 'available', 'running', 'waiting')"

# -- daemons ---------------------------------------------------------------------

REGISTER_DAEMON = """
INSERT INTO jobd.daemons (id, region, host, pid, version, status)
VALUES ($1, $2, $3, $4, $5, 'starting')
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), status = 'starting'
"""

# One statement per interval renews the daemon's heartbeat and every lease it holds.
# Returns the attempts ($6 ids, $7 lease tokens) it could NOT renew: their lease is gone
# (rescued after a stall, reclaimed, finished elsewhere), so the daemon stops them.
HEARTBEAT = """
WITH d AS (
    UPDATE jobd.daemons SET heartbeat_at = now(), status = $3, draining = $4 WHERE id = $1
), renewed AS (
    UPDATE jobd.jobs SET lease_until = coalesce($5::timestamptz, now()) + $2 * interval '1 second'
    WHERE id IN (
        -- Only attempts this daemon still runs ($6, $7): one lost with a restarted actor
        -- must lapse and be rescued. Locked in id order, like finishes, so they cannot
        -- deadlock.
        SELECT id FROM jobd.jobs
        WHERE state = 'running' AND lease_owner = $1
          AND ($6::bigint[] IS NULL
               OR (id, lease_token) IN (SELECT * FROM unnest($6::bigint[], $7::int[])))
        ORDER BY id
        FOR UPDATE
    )
    RETURNING id, lease_token
)
SELECT w.id, w.token FROM unnest($6::bigint[], $7::int[]) AS w(id, token)
WHERE NOT EXISTS (SELECT 1 FROM renewed r WHERE r.id = w.id AND r.lease_token = w.token)
"""

DEREGISTER_DAEMON = "DELETE FROM jobd.daemons WHERE id = $1"

# The queues a daemon serves (at start and after a reload), so an enqueue or a pause can
# tell a queue nobody serves (a typo) from one served elsewhere.
SET_DAEMON_QUEUES = "UPDATE jobd.daemons SET queues = $2::text[] WHERE id = $1"

LIVE_QUEUES = """
SELECT DISTINCT unnest(queues) AS queue FROM jobd.daemons
WHERE heartbeat_at > now() - $1 * interval '1 second'
"""

# Limits jobd.enqueue (SQL, migration 0008) cannot read from the TOML: each daemon writes
# its own at start, so the function applies what the daemons apply.
PUT_SETTINGS = """
INSERT INTO jobd.settings (name, value, updated_at)
SELECT key, value, now() FROM jsonb_each($1::jsonb)
ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
"""

LIST_DAEMONS = """
SELECT id, region, host, pid, version, started_at, heartbeat_at, draining, status
FROM jobd.daemons ORDER BY region, started_at
"""

FORGET_DEAD_DAEMONS = """
DELETE FROM jobd.daemons
WHERE heartbeat_at < coalesce($2::timestamptz, now()) - $1 * interval '1 second'
"""

# -- enqueue ---------------------------------------------------------------------

# The rows to enqueue travel as one JSON array of actors.ports.NewJob, encoded by msgspec
# in one call: eleven parameter arrays cost asyncpg a Python-level type check per
# element, more than Postgres spends parsing the JSON. `args` arrives as JSON text.
def job_rows(param: str) -> str:
    """FROM-clause item: the NewJob JSON array in parameter `param`, one row each, numbered."""
    return f"""
ROWS FROM (json_to_recordset({param}::json) AS (queue text, kind text, args text, key text,
           unique_key text, priority int, delay_s float8, max_attempts int, tags text[],
           timeout_s float8, cost int))
    WITH ORDINALITY AS x(queue, kind, args, key, unique_key, priority, delay_s, max_attempts,
                         tags, timeout_s, cost, ord)
"""

def job_rows_json(jobs: list[NewJob]) -> str:
    """The parameter for job_rows(): NewJob's fields by name, args as JSON text."""
    return msgspec.json.encode(jobs).decode()


# A constant sequence name: pg_get_serial_sequence() here would look the catalog up
# once per row, which cost more than the insert itself.
NEXT_JOB_ID = "nextval('jobd.jobs_id_seq'::regclass)"

# Ids are drawn up front so each input row maps back to its job even when some rows
# hit an unfinished job's unique key (ON CONFLICT DO NOTHING returns nothing for them).
ENQUEUE_MANY = f"""
WITH input AS (
    SELECT {NEXT_JOB_ID} AS id, x.* FROM {job_rows('$1')}
),
ins AS (
    INSERT INTO jobd.jobs (id, queue, kind, args, key, unique_key, priority, run_at, state,
                           max_attempts, tags, timeout_s, cost)
    SELECT id, queue, kind, args::jsonb, key, unique_key, priority,
           now() + coalesce(delay_s, 0) * interval '1 second',
           CASE WHEN coalesce(delay_s, 0) > 0 THEN 'scheduled' ELSE 'available' END,
           max_attempts, coalesce(tags::text[], '{{}}'), timeout_s, coalesce(cost, 1)
    FROM input ORDER BY ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN {UNFINISHED}
    DO NOTHING
    RETURNING id, unique_key
)
SELECT x.ord, coalesce(i.id, dup.id, ex.id) AS id, i.id IS NOT NULL AS created
FROM input x
LEFT JOIN ins i ON i.id = x.id
LEFT JOIN ins dup ON i.id IS NULL AND dup.unique_key = x.unique_key
LEFT JOIN jobd.jobs ex ON i.id IS NULL AND dup.id IS NULL
    AND ex.unique_key = x.unique_key AND ex.state IN {UNFINISHED}
ORDER BY x.ord
"""

FIND_UNFINISHED_BY_UNIQUE_KEY = f"""
SELECT id FROM jobd.jobs WHERE unique_key = $1 AND state IN {UNFINISHED}
"""

# -- claim, finish, progress -------------------------------------------------------

CLAIMED_COLUMNS = """
j.id, j.queue, j.kind, j.args::text AS args, j.key, j.priority, j.attempt, j.max_attempts,
j.lease_token, j.timeout_s, j.tags, j.errors::text AS errors, j.unique_key, j.run_at,
j.created_at, j.started_at
"""

# The same claim under flow control: jobd.claim_flow (migration 0009) walks the queue's
# keys that have available jobs round robin and takes what every limit allows.
CLAIM_FLOW = f"""
SELECT {CLAIMED_COLUMNS}
FROM jobd.claim_flow($1, $2, $3, $4, $6::text[], $7::text[], $5::timestamptz, $8::jsonb) j
"""

# Per key: what runs, what waits, and the bucket and breaker state (`jobctl stats`).
# Counted from the jobs in one pass; a key whose row was pruned (it is in its default
# state) still shows while it has jobs.
KEY_STATS = """
WITH counts AS (
    SELECT queue, key, count(*) FILTER (WHERE state = 'running') AS running,
           count(*) FILTER (WHERE state <> 'running') AS queued
    FROM jobd.jobs
    WHERE state IN ('available', 'scheduled', 'running') AND key IS NOT NULL
      AND ($1::text IS NULL OR queue = $1)
    GROUP BY queue, key
)
SELECT coalesce(f.queue, c.queue) AS queue, coalesce(f.key, c.key) AS key, f.tokens,
       coalesce(f.rate_factor, 1) AS rate_factor, f.paused_until,
       coalesce(f.consecutive_failures, 0) AS consecutive_failures, f.last_failure_at,
       coalesce(c.running, 0) AS running, coalesce(c.queued, 0) AS queued
FROM (SELECT * FROM jobd.flow_keys WHERE key <> '' AND ($1::text IS NULL OR queue = $1)) f
FULL JOIN counts c ON c.queue = f.queue AND c.key = f.key
ORDER BY queued DESC, queue, key
LIMIT $2
"""

# Priority aging: a job waiting longer than `aging` moves one priority step up per
# period, never past the floor, so batch work is never starved by interactive work.
AGE_PRIORITIES = """
UPDATE jobd.jobs SET
    base_priority = coalesce(base_priority, priority),
    priority = greatest($3, coalesce(base_priority, priority)
        - floor(extract(epoch FROM coalesce($4::timestamptz, now()) - run_at) / $2)::int)
WHERE id IN (
    SELECT id FROM jobd.jobs
    WHERE queue = $1 AND state IN ('available', 'scheduled')
      AND run_at < coalesce($4::timestamptz, now()) - $2 * interval '1 second'
      AND priority > $3
      AND priority > greatest($3, coalesce(base_priority, priority)
          - floor(extract(epoch FROM coalesce($4::timestamptz, now()) - run_at) / $2)::int)
    LIMIT $5 FOR UPDATE SKIP LOCKED)
"""

# Only kinds this daemon has handlers for, so daemons with different handler sets
# can share a queue during a rolling deploy.
# The picked ids go in as an array so the update is always a primary-key probe per row:
# joined as a CTE, the planner hashes the whole table when its statistics are stale.
# The reaper's rescues and retention deletes below are written the same way.
CLAIM = f"""
UPDATE jobd.jobs j
SET state = 'running', attempt = j.attempt + 1, lease_token = j.lease_token + 1,
    lease_owner = $3, lease_until = coalesce($5::timestamptz, now()) + $4 * interval '1 second',
    started_at = coalesce($5::timestamptz, now()), progress = NULL, progress_note = NULL
WHERE j.id = ANY(ARRAY(
    SELECT id FROM jobd.jobs
    WHERE queue = $1 AND state IN ('available', 'scheduled')
      AND run_at <= coalesce($5::timestamptz, now())
      AND kind = ANY($6::text[])
      AND (key IS NULL OR NOT key = ANY($7::text[]))
    ORDER BY priority, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
RETURNING {CLAIMED_COLUMNS}
"""

# Seconds until the next job of this queue is due, on the database's clock.
NEXT_DUE = """
SELECT extract(epoch FROM min(run_at) - now())::float8 FROM jobd.jobs
WHERE queue = $1 AND state IN ('available', 'scheduled') AND kind = ANY($2::text[])
  AND (key IS NULL OR NOT key = ANY($3::text[]))
"""

# For statements that look rows up by the ids they are given. Statistics gathered while
# nothing runs (a backlog just enqueued) say almost no row is 'running', so with the
# literal the generic plan walks the partial index of running rows and tests it against
# every input row: quadratic, seconds per finish batch. A sub-select is a parameter to
# the planner: no partial index matches it and its estimate is ordinary, so the input
# rows drive primary-key probes.
RUNNING = "(SELECT 'running')"

# The lease token fences every finish: a row whose token moved on (rescued and
# re-claimed) is not touched, and its id is missing from RETURNING.
FINISH_MANY = f"""
WITH done AS (
    UPDATE jobd.jobs j SET
        state = x.state,
        result = coalesce(x.result::jsonb, j.result),
        run_at = CASE WHEN x.delay_s IS NULL THEN j.run_at
                      ELSE now() + x.delay_s * interval '1 second' END,
        -- A snooze right after a snooze replaces it (counting them, keeping the first's
        -- time): a job snoozing for days would otherwise grow one entry per snooze.
        errors = CASE WHEN x.error IS NULL THEN j.errors
                      WHEN x.error::jsonb ->> 'class' = 'snooze'
                           AND j.errors -> -1 ->> 'class' = 'snooze'
                      THEN (j.errors - (-1)) || jsonb_build_array(x.error::jsonb
                           || jsonb_build_object(
                               'snoozes', coalesce(CASE WHEN jsonb_typeof(j.errors -> -1 -> 'snoozes')
                                   = 'number' THEN (j.errors -> -1 ->> 'snoozes')::numeric END, 1) + 1,
                               'first_at', coalesce(j.errors -> -1 -> 'first_at',
                                                    j.errors -> -1 -> 'at')))
                      ELSE j.errors || jsonb_build_array(x.error::jsonb) END,
        attempt = j.attempt - x.refund,
        finished_at = CASE WHEN x.state IN ('completed', 'failed', 'cancelled') THEN now() END,
        progress = CASE WHEN x.state = 'completed' THEN 100 ELSE j.progress END,
        lease_owner = NULL, lease_until = NULL, cancel_requested = false
    FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::double precision[],
                $6::text[], $7::int[], $8::text[], $9::double precision[])
         AS x(id, token, state, result, delay_s, error, refund, flow, pause_s)
    WHERE j.id = x.id AND j.lease_token = x.token AND j.state = {RUNNING}
    RETURNING j.id, j.queue, j.key, x.flow, x.pause_s
),
-- What the remote side said, per key: a rate limit pauses the key on every daemon (for
-- the time the remote gave, else the queue's rate_limit_pause, which the claims keep in
-- jobd.flow_queues) and halves its adaptive rate; successes raise the rate additively
-- and close the breaker.
effects AS (
    SELECT d.queue, d.key,
           count(*) FILTER (WHERE d.flow = 'ok') AS ok,
           count(*) FILTER (WHERE d.flow = 'fail') AS failed,
           count(*) FILTER (WHERE d.flow = 'rate_limited') AS limited,
           max(CASE WHEN d.flow = 'rate_limited'
                    THEN coalesce(d.pause_s, q.rate_limit_pause_s, 0) END) AS pause_s
    FROM done d LEFT JOIN jobd.flow_queues q ON q.queue = d.queue
    WHERE d.flow IS NOT NULL AND d.key IS NOT NULL
    GROUP BY d.queue, d.key
),
-- Lock the key rows in one order, so two daemons' finishes cannot deadlock; only rows
-- this batch changes (successes on a healthy key write nothing).
locked AS (
    SELECT f.queue, f.key FROM jobd.flow_keys f JOIN effects e USING (queue, key)
    WHERE e.limited > 0 OR e.failed > 0
       OR (e.ok > 0 AND (f.rate_factor < 1 OR f.consecutive_failures > 0))
    ORDER BY f.queue, f.key
    FOR UPDATE OF f
),
flow AS (
    UPDATE jobd.flow_keys f SET
        paused_until = CASE WHEN e.limited > 0
            THEN greatest(coalesce(f.paused_until, now()), now() + e.pause_s * interval '1 second')
            ELSE f.paused_until END,
        rate_factor = CASE WHEN e.limited > 0 THEN greatest(0.05, f.rate_factor * 0.5)
                           ELSE least(1.0, f.rate_factor + 0.02 * e.ok) END,
        consecutive_failures = CASE WHEN e.ok > 0 THEN 0
                                    ELSE f.consecutive_failures + e.failed END,
        last_failure_at = CASE WHEN e.failed > 0 THEN now() ELSE f.last_failure_at END
    FROM effects e JOIN locked l USING (queue, key)
    WHERE f.queue = e.queue AND f.key = e.key
    RETURNING f.queue, f.key, f.consecutive_failures
),
-- A key whose row was pruned (it was in its default state) gets it back, with this
-- batch's effects applied to the defaults.
fresh AS (
    INSERT INTO jobd.flow_keys (queue, key, paused_until, rate_factor, consecutive_failures,
                                last_failure_at)
    SELECT e.queue, e.key,
           CASE WHEN e.limited > 0 THEN now() + e.pause_s * interval '1 second' END,
           CASE WHEN e.limited > 0 THEN 0.5 ELSE 1 END,
           CASE WHEN e.ok > 0 THEN 0 ELSE e.failed END,
           CASE WHEN e.failed > 0 THEN now() END
    FROM effects e
    WHERE (e.limited > 0 OR e.failed > 0)
      AND NOT EXISTS (SELECT 1 FROM jobd.flow_keys f WHERE f.queue = e.queue AND f.key = e.key)
    ORDER BY e.queue, e.key
    ON CONFLICT DO NOTHING
    RETURNING queue, key, consecutive_failures
)
SELECT id, NULL::text AS key, NULL::int AS failures FROM done
UNION ALL
SELECT NULL, queue || ':' || key, consecutive_failures FROM flow
UNION ALL
SELECT NULL, queue || ':' || key, consecutive_failures FROM fresh
"""

WRITE_PROGRESS = f"""
UPDATE jobd.jobs j SET
    progress = coalesce(x.pct, j.progress), progress_note = coalesce(x.note, j.progress_note),
    lease_until = now() + $5 * interval '1 second'
FROM unnest($1::bigint[], $2::int[], $3::real[], $4::text[]) AS x(id, token, pct, note)
WHERE j.id = x.id AND j.lease_token = x.token AND j.state = {RUNNING}
"""

# -- cancel ---------------------------------------------------------------------

CANCEL = """
WITH target AS (
    SELECT id, state FROM jobd.jobs WHERE id = $1 FOR UPDATE
), queued AS (
    UPDATE jobd.jobs j SET state = 'cancelled', finished_at = now()
    FROM target t WHERE j.id = t.id AND t.state IN ('scheduled', 'available', 'waiting')
    RETURNING j.id
), running AS (
    UPDATE jobd.jobs j SET cancel_requested = true
    FROM target t WHERE j.id = t.id AND t.state = 'running'
    RETURNING j.id, pg_notify('jobd_cancel', j.id::text)
)
SELECT t.state AS was,
       CASE WHEN EXISTS (SELECT 1 FROM queued) THEN 'cancelled'
            WHEN EXISTS (SELECT 1 FROM running) THEN 'cancelling'
            ELSE t.state END AS now
FROM target t
"""

RUNNING_CANCEL_REQUESTS = """
SELECT id FROM jobd.jobs
WHERE state = 'running' AND lease_owner = $1 AND cancel_requested
"""

# -- reaper -----------------------------------------------------------------------

# Expired leases: the daemon holding them is gone (or cut off from the database).
# Bumping the token fences the lost attempt out.
RESCUE_EXPIRED = """
UPDATE jobd.jobs j SET
    state = CASE WHEN j.cancel_requested THEN 'cancelled'
                 WHEN j.attempt >= j.max_attempts THEN 'failed'
                 ELSE 'available' END,
    finished_at = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts
                       THEN coalesce($2::timestamptz, now()) END,
    run_at = coalesce($2::timestamptz, now()),
    lease_token = j.lease_token + 1, lease_owner = NULL, lease_until = NULL,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'at', coalesce($2::timestamptz, now()), 'class', 'rescued',
        'message', 'lease expired (daemon ' || coalesce(j.lease_owner, '?') || ' stopped renewing)',
        'duration_s', extract(epoch FROM coalesce($2::timestamptz, now()) - j.started_at)))
WHERE j.id = ANY(ARRAY(
    SELECT id FROM jobd.jobs
    WHERE state = 'running' AND lease_until < coalesce($2::timestamptz, now())
    ORDER BY lease_until
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
RETURNING j.id, j.queue, j.kind, j.state
"""

# A running attempt past its timeout plus grace on any daemon (its worker should
# have stopped it; this catches a daemon whose loop is stuck but still heartbeats).
# A timeout_s outside (0, 1e9] (NaN, Infinity, 1e308: a row from before the CHECKs or
# around them; actors/services/worker.py MAX_TIMEOUT_S) never reaches the interval arithmetic,
# which would fail the whole statement ("interval out of range") and so every pass: the
# CASE keeps it out (unlike AND, CASE fixes the order). Such a job fails at once as
# invalid_value, its timeout dropped so the row meets the CHECK again.
EXPIRE_OVERDUE = """
UPDATE jobd.jobs j SET
    state = CASE WHEN j.attempt >= j.max_attempts OR p.insane THEN 'failed' ELSE 'available' END,
    finished_at = CASE WHEN j.attempt >= j.max_attempts OR p.insane
                       THEN coalesce($3::timestamptz, now()) END,
    run_at = coalesce($3::timestamptz, now()),
    lease_token = j.lease_token + 1, lease_owner = NULL, lease_until = NULL,
    timeout_s = CASE WHEN p.insane THEN NULL ELSE j.timeout_s END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'at', coalesce($3::timestamptz, now()),
        'class', CASE WHEN p.insane THEN 'invalid_value' ELSE 'timeout' END,
        'message', CASE WHEN p.insane
            THEN 'timeout_s ' || j.timeout_s || ' is not a usable timeout (0 < timeout_s <= 1e9 s);'
                 || ' the job was failed and its timeout dropped'
            ELSE 'exceeded its timeout of ' || j.timeout_s || ' s plus ' || $2 || ' s grace' END,
        'duration_s', CASE WHEN isfinite(j.started_at)
            THEN extract(epoch FROM coalesce($3::timestamptz, now()) - j.started_at) END))
FROM (
    SELECT id, NOT coalesce(timeout_s > 0 AND timeout_s <= 1e9, false) AS insane
    FROM jobd.jobs
    WHERE state = 'running' AND timeout_s IS NOT NULL
      AND CASE WHEN timeout_s > 0 AND timeout_s <= 1e9
               THEN started_at + (timeout_s + least($2::float8, 1e9)) * interval '1 second'
                    < coalesce($3::timestamptz, now())
               ELSE true END
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) p
WHERE j.id = p.id
RETURNING j.id, j.queue, j.kind, j.state
"""

PROMOTE_DUE = """
UPDATE jobd.jobs SET state = 'available'
WHERE id IN (SELECT id FROM jobd.jobs
             WHERE state = 'scheduled' AND run_at <= coalesce($2::timestamptz, now())
             LIMIT $1 FOR UPDATE SKIP LOCKED)
"""

# Retention: a finished job goes once it is older than max_age or no longer among the
# newest max_count of its state (the OFFSET finds that boundary on the index). Small batches keep locks short.
# A child whose parent has not finished stays whatever its age: the parent's `gather`
# reads the child's row.
PRUNE_FINISHED = f"""
WITH bound AS (
    SELECT coalesce($5::timestamptz, now()) - $2 * interval '1 second' AS too_old,
           (SELECT finished_at FROM jobd.jobs WHERE state = $1
            ORDER BY finished_at DESC OFFSET $3 LIMIT 1) AS last_past_count
)
DELETE FROM jobd.jobs WHERE id = ANY(ARRAY(
    SELECT j.id FROM jobd.jobs j, bound b
    -- The greatest() bound lets the scan walk jobs_finished from its oldest end and
    -- stop at the batch size; the OR says exactly which rows go.
    WHERE j.state = $1 AND j.finished_at <= greatest(b.too_old, b.last_past_count)
      AND (j.finished_at < b.too_old OR j.finished_at <= b.last_past_count)
      -- A scalar sub-select, not NOT EXISTS: the planner may hash that one, which is a
      -- scan of every unfinished job per pass; this is one primary-key probe per child.
      AND (j.parent_id IS NULL OR coalesce(
          (SELECT p.state FROM jobd.jobs p WHERE p.id = j.parent_id), 'gone') NOT IN {UNFINISHED})
    ORDER BY j.finished_at
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
))
"""

# Idle flow keys: a row in its default state (no pause, breaker closed, full rate, full
# buckets) says nothing a missing row does not, so it goes once none of the key's jobs is
# available or running and the key has been idle (not served, not rate limited) for $2
# seconds; claims and finishes recreate it when the key is used again. A failure streak
# or a slowed adaptive rate is forgotten after $4 seconds without news.
PRUNE_IDLE_KEYS = """
DELETE FROM jobd.flow_keys d
USING (
    SELECT f.queue, f.key FROM jobd.flow_keys f
    WHERE f.key <> ''
      AND coalesce(f.served_at, '-infinity') < coalesce($3::timestamptz, now()) - $2 * interval '1 second'
      AND coalesce(f.paused_until, '-infinity')
          < coalesce($3::timestamptz, now()) - $2 * interval '1 second'
      AND (f.consecutive_failures = 0
           OR f.last_failure_at < coalesce($3::timestamptz, now()) - $4 * interval '1 second')
      AND (f.rate_factor >= 1 OR coalesce(f.paused_until, '-infinity')
           < coalesce($3::timestamptz, now()) - $4 * interval '1 second')
      AND ((f.tokens IS NULL AND f.cost_tokens IS NULL)
           OR f.full_at <= coalesce($3::timestamptz, now()))
      AND NOT EXISTS (SELECT 1 FROM jobd.jobs j
                      WHERE j.queue = f.queue AND j.key = f.key AND j.state = 'available')
      AND NOT EXISTS (SELECT 1 FROM jobd.jobs j
                      WHERE j.queue = f.queue AND j.key = f.key AND j.state = 'running')
    LIMIT $1
    FOR UPDATE OF f SKIP LOCKED
) idle
WHERE d.queue = idle.queue AND d.key = idle.key
"""

# -- reads ------------------------------------------------------------------------

JOB_COLUMNS = """
id, queue, kind, args::text AS args, key, priority, state, attempt, max_attempts, run_at,
lease_owner, lease_until, timeout_s, unique_key, tags, parent_id, progress, progress_note,
result::text AS result, errors::text AS errors, cancel_requested, created_at, started_at,
finished_at
"""

GET_JOB = f"SELECT {JOB_COLUMNS} FROM jobd.jobs WHERE id = $1"

STATS = """
SELECT queue, state, count(*) AS n FROM jobd.jobs GROUP BY queue, state ORDER BY queue, state
"""

# -- the control plane: filters, bulk operations, pauses -------------------------------

# Every filter is optional: a NULL parameter matches everything. $1..$11 are the
# filter, in protocol.commands.FILTER_FIELDS order; statements add theirs after it.
JOB_FILTER = """
    ($1::bigint[] IS NULL OR j.id = ANY($1))
AND ($2::text IS NULL OR j.queue = $2)
AND ($3::text IS NULL OR j.kind = $3)
AND ($4::text[] IS NULL OR j.state = ANY($4))
AND ($5::text IS NULL OR j.key = $5)
AND ($6::text IS NULL OR (j.tags @> ARRAY[$6::text] AND j.tags <> '{}'))
AND ($7::text IS NULL OR j.unique_key = $7)
AND ($8::timestamptz IS NULL OR j.created_at >= $8)
AND ($9::timestamptz IS NULL OR j.created_at < $9)
AND ($10::timestamptz IS NULL OR j.finished_at >= $10)
AND ($11::timestamptz IS NULL OR j.finished_at < $11)
"""

# A page of jobs: args, result and errors larger than $14 bytes are left out (NULL /
# empty) and a long progress_note is cut, all named in `truncated`, so one page of big
# values never becomes a reply over the frame cap. The stored size is checked first, so
# a large value is not even detoasted unless it compresses below the limit.
LIST_JOBS = f"""
SELECT j.id, j.queue, j.kind, CASE WHEN big.args THEN NULL ELSE j.args::text END AS args,
       j.key, j.priority, j.state, j.attempt, j.max_attempts, j.run_at, j.lease_owner,
       j.lease_until, j.timeout_s, j.unique_key, j.tags, j.parent_id, j.progress,
       CASE WHEN big.note THEN left(j.progress_note, $14 / 4) ELSE j.progress_note END
           AS progress_note,
       CASE WHEN big.result THEN NULL ELSE j.result::text END AS result,
       CASE WHEN big.errors THEN '[]' ELSE j.errors::text END AS errors,
       j.cancel_requested, j.created_at, j.started_at, j.finished_at,
       array_remove(ARRAY[CASE WHEN big.args THEN 'args' END,
                          CASE WHEN big.result THEN 'result' END,
                          CASE WHEN big.errors THEN 'errors' END,
                          CASE WHEN big.note THEN 'progress_note' END], NULL) AS truncated
FROM jobd.jobs j,
LATERAL (SELECT
    CASE WHEN pg_column_size(j.args) > $14 THEN true
         ELSE octet_length(j.args::text) > $14 END AS args,
    CASE WHEN j.result IS NULL THEN false WHEN pg_column_size(j.result) > $14 THEN true
         ELSE octet_length(j.result::text) > $14 END AS result,
    CASE WHEN pg_column_size(j.errors) > $14 THEN true
         ELSE octet_length(j.errors::text) > $14 END AS errors,
    coalesce(octet_length(j.progress_note) > $14, false) AS note) big
WHERE {JOB_FILTER} AND ($12::bigint IS NULL OR j.id < $12)
ORDER BY j.id DESC
LIMIT $13
"""

SUMMARIZE_JOBS = f"""
SELECT j.state, count(*) AS n FROM jobd.jobs j WHERE {JOB_FILTER} GROUP BY j.state
"""

# $12 = dry run: count what would change without changing it.
CANCEL_MATCHING = f"""
WITH matched AS (
    SELECT j.id, j.state FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state IN {UNFINISHED}
    FOR UPDATE SKIP LOCKED
), queued AS (
    UPDATE jobd.jobs j SET state = 'cancelled', finished_at = now()
    FROM matched m WHERE j.id = m.id AND m.state <> 'running' AND NOT $12
    RETURNING j.id
), running AS (
    UPDATE jobd.jobs j SET cancel_requested = true
    FROM matched m WHERE j.id = m.id AND m.state = 'running' AND NOT $12
    RETURNING j.id, pg_notify('jobd_cancel', j.id::text)
)
SELECT (SELECT count(*) FROM matched) AS matched,
       (SELECT count(*) FROM queued) + (SELECT count(*) FROM running) AS changed
"""

# Attempts are topped up so a job that ran out can run once more.
RETRY_MATCHING = f"""
WITH matched AS (
    SELECT j.id FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state IN ('failed', 'cancelled', 'scheduled')
    FOR UPDATE SKIP LOCKED
), changed AS (
    UPDATE jobd.jobs j SET state = 'available', run_at = now(), finished_at = NULL,
        max_attempts = greatest(j.max_attempts, j.attempt + 1), cancel_requested = false
    FROM matched m WHERE j.id = m.id AND NOT $12
    RETURNING j.id
)
SELECT (SELECT count(*) FROM matched) AS matched, (SELECT count(*) FROM changed) AS changed
"""

REPLAY_MATCHING = f"""
WITH matched AS (
    SELECT j.* FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state IN ('completed', 'failed', 'cancelled')
    ORDER BY j.id
), created AS (
    INSERT INTO jobd.jobs (queue, kind, args, key, priority, max_attempts, tags, timeout_s,
                           parent_id)
    SELECT queue, kind, args, key, priority, max_attempts, tags, timeout_s, parent_id
    FROM matched WHERE NOT $12
    ORDER BY id
    RETURNING id
)
SELECT (SELECT count(*) FROM matched) AS matched,
       coalesce((SELECT array_agg(id ORDER BY id) FROM created), '{{}}') AS ids
"""

DELETE_MATCHING = f"""
WITH matched AS (
    SELECT j.id FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state <> 'running'
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM jobd.jobs j USING matched m WHERE j.id = m.id AND NOT $12
    RETURNING j.id
)
SELECT (SELECT count(*) FROM matched) AS matched, (SELECT count(*) FROM deleted) AS changed
"""

# key '' is the whole queue (a primary key cannot hold NULL).
PAUSE = """
WITH p AS (
    INSERT INTO jobd.pauses (queue, key) VALUES ($1, coalesce($2, ''))
    ON CONFLICT DO NOTHING RETURNING 1
)
SELECT pg_notify('jobd_paused', $1)
"""

RESUME = """
WITH r AS (DELETE FROM jobd.pauses WHERE queue = $1 AND key = coalesce($2, '') RETURNING 1)
SELECT pg_notify('jobd_paused', $1)
"""

LIST_PAUSES = "SELECT queue, key, paused_at FROM jobd.pauses ORDER BY queue, key"

# -- metrics (daemon.metrics: one leader per database computes the queue gauges) ----

METRICS_LEADER_LOCK = 0x6A6F6264_6D657472  # "jobd" "metr": a session lock, never released by SQL

TRY_METRICS_LEADER = "SELECT pg_try_advisory_lock($1)"

# One arm per partial index (jobs_claimable, jobs_leases, jobs_finished), so no arm
# scans the whole table; 'waiting' has no index yet and is not counted.
QUEUE_COUNTS = """
SELECT queue, state, count(*) AS n FROM jobd.jobs
WHERE state IN ('available', 'scheduled') GROUP BY queue, state
UNION ALL
SELECT queue, state, count(*) FROM jobd.jobs WHERE state = 'running' GROUP BY queue, state
UNION ALL
SELECT queue, state, count(*) FROM jobd.jobs
WHERE state IN ('completed', 'failed', 'cancelled') GROUP BY queue, state
"""

# Claimable = available, or scheduled and already due (the claim takes both).
QUEUE_OLDEST_AVAILABLE = """
SELECT queue,
       extract(epoch FROM coalesce($1::timestamptz, now()) - min(run_at))::float8 AS age_s
FROM jobd.jobs
WHERE state IN ('available', 'scheduled') AND run_at <= coalesce($1::timestamptz, now())
GROUP BY queue
"""
