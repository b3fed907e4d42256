"""A job's life: enqueue, claim, progress, finish, cancel, read, promote and prune."""

from __future__ import annotations

from daemon.store.sql.common import NEXT_JOB_ID, RUNNING, UNFINISHED, job_rows

# Ids are drawn up front so each input row maps back to its job even when some rows
# hit an unfinished job's unique key (ON CONFLICT DO NOTHING returns nothing for them).
# $1 = the jobs, a JSON array of NewJob (common.job_rows_json).
ENQUEUE_MANY = f"""
WITH input AS (
    SELECT {NEXT_JOB_ID} AS id, x.* FROM {job_rows('$1')}
),
ins AS (
    INSERT INTO jobd.jobs (id, queue, kind, args, key, unique_key, priority, run_at, state,
                           max_attempts, tags, timeout_s, cost, traceparent)
    SELECT id, queue, kind, args::jsonb, key, unique_key, priority,
           now() + coalesce(delay_s, 0) * interval '1 second',
           CASE WHEN coalesce(delay_s, 0) > 0 THEN 'scheduled' ELSE 'available' END,
           max_attempts, coalesce(tags::text[], '{{}}'), timeout_s, coalesce(cost, 1),
           traceparent
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

# A batch without unique keys has no conflict to resolve: a plain INSERT, half
# ENQUEUE_MANY's Postgres CPU for one row (320 against 630 us, bench/enqueue_breakdown.py),
# whose conflict joins also grew with the table. Ids are drawn in input order (the
# volatile nextval is evaluated after the sort), so the returned ids, sorted, are the
# input rows' in order. $1 = the jobs, $2 = parent job id or NULL.
ENQUEUE_PLAIN = f"""
INSERT INTO jobd.jobs (id, queue, kind, args, key, unique_key, priority, run_at, state,
                       max_attempts, tags, timeout_s, cost, parent_id, traceparent)
SELECT {NEXT_JOB_ID}, queue, kind, args::jsonb, key, unique_key, priority,
       now() + coalesce(delay_s, 0) * interval '1 second',
       CASE WHEN coalesce(delay_s, 0) > 0 THEN 'scheduled' ELSE 'available' END,
       max_attempts, coalesce(tags::text[], '{{}}'), timeout_s, coalesce(cost, 1), $2::bigint,
       traceparent
FROM {job_rows('$1')}
ORDER BY ord
RETURNING id
"""

# Rows of kinds with flow-control tools (NewJob.tool_keys set): migration 0020's
# function applies debounce, batching, throttle, singleton and unique windows.
# $1 = the jobs, a JSON array of NewJob, $2 = parent job id or NULL, $3 = now (NULL:
# the database's clock). One row per input row, in input order.
ENQUEUE_TOOLS = """
SELECT ord, id, created, outcome FROM jobd.enqueue_tools($1::json, $2, $3) ORDER BY ord
"""

# Each kind's flow-control tools (actors/tools.Tools), written at start and on reload by
# every daemon that has the handler: the last writer wins. A kind declared here without
# tools loses its row, so removing a tool from the code takes effect.
# $1 = a JSON array of {kind, <Tools fields>}, $2 = kinds declared here without tools.
SYNC_KIND_TOOLS = """
WITH gone AS (
    DELETE FROM jobd.kind_tools WHERE kind = ANY($2::text[])
)
INSERT INTO jobd.kind_tools (kind, debounce_s, debounce_max_s, debounce_field, batch_size, batch_timeout_s, batch_field, throttle_per_s, throttle_burst, throttle_mode, throttle_field, singleton_mode, singleton_field, unique_for_s, unique_mode, updated_at)
SELECT kind, debounce_s, debounce_max_s, debounce_field, batch_size, batch_timeout_s, batch_field, throttle_per_s, throttle_burst, throttle_mode, throttle_field, singleton_mode, singleton_field, unique_for_s, unique_mode, now()
FROM json_populate_recordset(NULL::jobd.kind_tools, $1::json)
ON CONFLICT (kind) DO UPDATE SET
    debounce_s = EXCLUDED.debounce_s,
    debounce_max_s = EXCLUDED.debounce_max_s,
    debounce_field = EXCLUDED.debounce_field,
    batch_size = EXCLUDED.batch_size,
    batch_timeout_s = EXCLUDED.batch_timeout_s,
    batch_field = EXCLUDED.batch_field,
    throttle_per_s = EXCLUDED.throttle_per_s,
    throttle_burst = EXCLUDED.throttle_burst,
    throttle_mode = EXCLUDED.throttle_mode,
    throttle_field = EXCLUDED.throttle_field,
    singleton_mode = EXCLUDED.singleton_mode,
    singleton_field = EXCLUDED.singleton_field,
    unique_for_s = EXCLUDED.unique_for_s,
    unique_mode = EXCLUDED.unique_mode,
    updated_at = now()
"""

# For a producer without a kind's handler module. No parameters.
TOOL_KINDS = "SELECT kind FROM jobd.kind_tools"

# The COPY path (store.jobs.copy_jobs) for a batch without unique keys: COPY cannot say
# ON CONFLICT, and without a conflict nothing needs mapping back, so ids are drawn first
# and travel with the rows. One call draws them all, ascending in input order as
# ENQUEUE_MANY draws them, with the transaction's now(): run_at is computed from it
# (as ENQUEUE_MANY's `now() + delay_s * interval '1 second'`), created_at is the same
# now() by default.
# $1 = how many ids.
RESERVE_JOB_IDS = f"""
SELECT now() AS now,
       ARRAY(SELECT {NEXT_JOB_ID} FROM generate_series(1, $1) ORDER BY 1) AS ids
"""

# Binary COPY (asyncpg's copy_records_to_table) into jobd.jobs. COPY fires the AFTER
# INSERT statement trigger as an INSERT does: one NOTIFY per queue wakes the claimers.
# The first columns always travel; each optional one only when some row of the batch
# differs from the column's default (0001_init), which the rows left out then take.
# Encoding is the daemon's cost per row: an empty text[] alone was 2 us of 5, run_at 1.5.
COPY_SCHEMA, COPY_TABLE = "jobd", "jobs"
COPY_ALWAYS = ("id", "queue", "kind", "args", "priority", "max_attempts")
# Left out, a column takes its default: key NULL, run_at now() (the transaction's, as
# RESERVE_JOB_IDS returns it), state 'available', tags '{}', timeout_s NULL, cost 1,
# parent_id NULL, traceparent NULL.
COPY_OPTIONAL = ("key", "run_at", "state", "tags", "timeout_s", "cost", "parent_id",
                 "traceparent")

# $1 = unique key.
FIND_UNFINISHED_BY_UNIQUE_KEY = f"""
SELECT id FROM jobd.jobs WHERE unique_key = $1 AND state IN {UNFINISHED}
"""

# Children a handler enqueues (ctx.enqueue_batch): like ENQUEUE_MANY, plus parent_id,
# and a unique key is taken by ANY retained job with it, finished ones included, so a
# re-run parent (a second trigger for the same day) does not redo finished children.
# $1 = the children, a JSON array of NewJob (common.job_rows_json),
# $2 = the parent's job id.
ENQUEUE_CHILDREN = f"""
WITH input AS (
    SELECT {NEXT_JOB_ID} AS id, x.* FROM {job_rows('$1')}
), fresh AS (
    SELECT * FROM input i
    WHERE i.unique_key IS NULL
       OR NOT EXISTS (SELECT 1 FROM jobd.jobs j WHERE j.unique_key = i.unique_key)
), ins AS (
    INSERT INTO jobd.jobs (id, queue, kind, args, key, unique_key, priority, run_at, state,
                           max_attempts, tags, timeout_s, cost, parent_id, traceparent)
    SELECT id, queue, kind, args::jsonb, key, unique_key, priority,
           now() + coalesce(delay_s, 0) * interval '1 second',
           CASE WHEN coalesce(delay_s, 0) > 0 THEN 'scheduled' ELSE 'available' END,
           max_attempts, coalesce(tags, '{{}}'), timeout_s, coalesce(cost, 1), $2, traceparent
    FROM fresh ORDER BY ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN {UNFINISHED}
    DO NOTHING
    RETURNING id, unique_key
)
SELECT x.ord, coalesce(i.id, dup.id, ex.id) AS id, i.id IS NOT NULL AS created
FROM input x
LEFT JOIN ins i ON i.id = x.id
LEFT JOIN ins dup ON i.id IS NULL AND dup.unique_key = x.unique_key
LEFT JOIN LATERAL (
    SELECT j.id FROM jobd.jobs j
    WHERE i.id IS NULL AND dup.id IS NULL AND j.unique_key = x.unique_key
    ORDER BY j.state IN {UNFINISHED} DESC, j.id DESC LIMIT 1
) ex ON true
ORDER BY x.ord
"""

# `steps`: a workflow's stored steps as [[name, result, done], ...], read only for jobs
# marked has_steps (migration 0015); none for a job's first claim (lease token 1: steps
# are only written by an attempt of the job, and every claim, rescue and release moves
# the token, so no attempt came before this one); NULL for the rest, which then load on
# first use. `traceparent`: the producer's trace context (migration 0018), the parent of
# the attempt's span.
CLAIMED_COLUMNS = """
j.id, j.queue, j.kind, j.args::text AS args, j.key, j.priority, j.attempt, j.max_attempts,
j.lease_token, j.timeout_s, j.tags, j.errors::text AS errors, j.unique_key, j.run_at,
j.created_at, j.started_at,
CASE WHEN j.has_steps THEN (
    SELECT coalesce(jsonb_agg(jsonb_build_array(s.name, s.result, s.finished_at IS NOT NULL)),
                    '[]')::text
    FROM jobd.job_steps s WHERE s.job_id = j.id)
    WHEN j.lease_token = 1 THEN '[]' END AS steps,
j.traceparent
"""

# Only kinds this daemon has handlers for, so daemons with different handler sets
# can share a queue during a rolling deploy.
# The picked ids go in as an array so the update is always a primary-key probe per row:
# joined as a CTE, the planner hashes the whole table when its statistics are stale.
# The reaper's rescues and retention deletes below are written the same way.
# $1 = queue, $2 = batch size, $3 = daemon id (the lease owner), $4 = lease
# length (s), $5 = now (NULL: the database's clock), $6 = the kinds this daemon has handlers for,
# $7 = paused keys.
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
# $1 = queue, $2 = the kinds this daemon has handlers for, $3 = paused keys.
NEXT_DUE = """
SELECT extract(epoch FROM min(run_at) - now())::float8 FROM jobd.jobs
WHERE queue = $1 AND state IN ('available', 'scheduled') AND kind = ANY($2::text[])
  AND (key IS NULL OR NOT key = ANY($3::text[]))
"""

# The lease token fences every finish: a row whose token moved on (rescued and
# re-claimed) is not touched, and its id is missing from RETURNING.
# $1..$9 = parallel arrays, one element per attempt, in actors.ports.Outcome
# field order (store.jobs.outcome_columns): $1 = job id, $2 = lease token,
# $3 = state, $4 = result (JSON), $5 = delay_s, $6 = error (JSON), $7 = refund,
# $8 = flow, $9 = pause_s, $10 = steps, $11 = waiting_on.
#
# A workflow's suspension is written here too, so it costs no statement of its own
# (actors/workflow_context.py): `steps` is a JSON array of the sleeps
# ({"name", "until"}) and waits ({"name", "wait": true, "timeout_s"}) the run began,
# stored for the attempts that still held their lease ("[]": none, but the job has
# steps; either way it is marked has_steps, so its next claim returns them); `waiting_on` is what a waiting
# job waits for. An event wait's arrives with "timeout_s" in place of its start and
# deadline: it began when the attempt was claimed, its deadline runs from now. The
# before-wait trigger (migration 0005) sees the new waiting_on, so a child or an event
# that came first makes the job available in this same statement.
FINISH_MANY = f"""
WITH done AS (
    UPDATE jobd.jobs j SET
        state = x.state,
        result = coalesce(x.result::jsonb, j.result),
        run_at = CASE WHEN x.delay_s IS NULL OR x.state = 'running' THEN j.run_at
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
        -- 'running' detaches an HTTP handler's attempt that is waiting for its callback
        -- (actors/http_handler.py): no daemon's lease, the deadline in lease_until, so
        -- its key's slot stays counted and the reaper times it out; a cancel asked for
        -- meanwhile stays asked for.
        lease_owner = NULL,
        lease_until = CASE WHEN x.state = 'running' THEN now() + x.delay_s * interval '1 second' END,
        cancel_requested = x.state = 'running' AND j.cancel_requested,
        has_steps = j.has_steps OR x.steps IS NOT NULL,
        waiting_on = CASE WHEN x.waiting_on IS NULL THEN j.waiting_on
                          WHEN x.waiting_on::jsonb ? 'timeout_s'
                          THEN (x.waiting_on::jsonb - 'timeout_s') || jsonb_build_object(
                              'since', extract(epoch FROM j.started_at)::float8,
                              'deadline', extract(epoch FROM now())::float8
                                          + (x.waiting_on::jsonb ->> 'timeout_s')::float8)
                          ELSE x.waiting_on::jsonb END
    FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::double precision[],
                $6::text[], $7::int[], $8::text[], $9::double precision[], $10::text[],
                $11::text[])
         AS x(id, token, state, result, delay_s, error, refund, flow, pause_s, steps, waiting_on)
    WHERE j.id = x.id AND j.lease_token = x.token AND j.state = {RUNNING}
    RETURNING j.id, j.queue, j.key, x.flow, x.pause_s, x.steps, j.started_at
),
-- The first record of a sleep or wait wins, as in BEGIN_SLEEP and BEGIN_WAIT.
recorded AS (
    INSERT INTO jobd.job_steps (job_id, name, result, attempts, finished_at)
    SELECT d.id, s.name,
           CASE WHEN s.wait THEN jsonb_build_object(
                    'since', extract(epoch FROM d.started_at)::float8,
                    'deadline', extract(epoch FROM now())::float8 + s.timeout_s)
                ELSE jsonb_build_object('until', s.until) END,
           1, CASE WHEN s.wait THEN NULL ELSE to_timestamp(s.until) END
    FROM done d,
         jsonb_to_recordset(d.steps::jsonb) AS s(name text, until float8, wait boolean,
                                                 timeout_s float8)
    WHERE d.steps IS NOT NULL
    ORDER BY d.id, s.name
    ON CONFLICT (job_id, name) DO NOTHING
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

# $1 = job ids, $2 = lease tokens, $3 = percentages, $4 = notes (parallel
# arrays; a NULL keeps what is stored), $5 = lease length (s), renewed too.
WRITE_PROGRESS = f"""
UPDATE jobd.jobs j SET
    progress = coalesce(x.pct, j.progress), progress_note = coalesce(x.note, j.progress_note),
    lease_until = now() + $5 * interval '1 second'
FROM unnest($1::bigint[], $2::int[], $3::real[], $4::text[]) AS x(id, token, pct, note)
WHERE j.id = x.id AND j.lease_token = x.token AND j.state = {RUNNING}
"""

# $1 = job id.
CANCEL = """
WITH target AS (
    SELECT id, state, lease_owner IS NULL AND state = 'running' AS detached
    FROM jobd.jobs WHERE id = $1 FOR UPDATE
), queued AS (
    -- A detached attempt (waiting for an HTTP callback) runs on no daemon: cancelled
    -- now, its lease token bumped so the callback is refused.
    UPDATE jobd.jobs j SET state = 'cancelled', finished_at = now(),
        lease_token = CASE WHEN t.detached THEN j.lease_token + 1 ELSE j.lease_token END,
        lease_until = NULL
    FROM target t WHERE j.id = t.id
        AND (t.state IN ('scheduled', 'available', 'waiting') OR t.detached)
    RETURNING j.id
), running AS (
    UPDATE jobd.jobs j SET cancel_requested = true
    FROM target t WHERE j.id = t.id AND t.state = 'running' AND NOT t.detached
    RETURNING j.id, pg_notify('jobd_cancel', j.id::text)
)
SELECT t.state AS was,
       CASE WHEN EXISTS (SELECT 1 FROM queued) THEN 'cancelled'
            WHEN EXISTS (SELECT 1 FROM running) THEN 'cancelling'
            ELSE t.state END AS now
FROM target t
"""

# $1 = daemon id.
RUNNING_CANCEL_REQUESTS = """
SELECT id FROM jobd.jobs
WHERE state = 'running' AND lease_owner = $1 AND cancel_requested
"""

JOB_COLUMNS = """
id, queue, kind, args::text AS args, key, priority, state, attempt, max_attempts, run_at,
lease_owner, lease_until, timeout_s, unique_key, tags, parent_id, progress, progress_note,
result::text AS result, errors::text AS errors, cancel_requested, created_at, started_at,
finished_at, event_id
"""

# $1 = job id.
GET_JOB = f"SELECT {JOB_COLUMNS} FROM jobd.jobs WHERE id = $1"

# One pass over the table (a parallel sequential scan at 1,000,000 jobs, ~140 ms):
# finished jobs are most of it and jobs_finished lacks the queue, so per-index arms
# cannot beat it without widening that index (bench/dashboard_pages.py: same wall
# time, ~40 % less Postgres CPU, ~1 us more per finished job).
# No parameters.
STATS = """
SELECT queue, state, count(*) AS n FROM jobd.jobs GROUP BY queue, state ORDER BY queue, state
"""

# One arm per partial index (jobs_claimable, jobs_leases, jobs_waiting): the planner
# will not combine them for one `state IN (...)`, and a scan reads every finished row.
STATS_UNFINISHED = """
SELECT queue, state, count(*) AS n FROM (
    SELECT queue, state FROM jobd.jobs WHERE state IN ('available', 'scheduled')
    UNION ALL SELECT queue, state FROM jobd.jobs WHERE state = 'running'
    UNION ALL SELECT queue, state FROM jobd.jobs WHERE state = 'waiting'
) unfinished GROUP BY queue, state ORDER BY queue, state
"""

# $1 = batch size, $2 = now (NULL: the database's clock).
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
# $1 = state, $2 = max age (s), $3 = how many of the newest to keep,
# $4 = batch size, $5 = now (NULL: the database's clock).
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
      -- A kind's unique_for window (migration 0020) holds the key by this row: it stays
      -- until the window has passed, whatever retention says.
      AND (j.unique_key IS NULL OR NOT coalesce(
          (SELECT j.finished_at > coalesce($5::timestamptz, now()) - t.unique_for_s * interval '1 second'
           FROM jobd.kind_tools t WHERE t.kind = j.kind), false))
    ORDER BY j.finished_at
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
))
"""
