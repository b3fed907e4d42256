"""Durable workflows (actors/workflow.py): steps, children, waits, events. Schema and
wake-up triggers: migrations/0005_workflows.sql."""

from __future__ import annotations

from daemon.store.sql.common import NEXT_JOB_ID, RUNNING, UNFINISHED, job_rows

# Every step of one job, once per attempt: memoized steps then cost no round trip.
# $1 = job id.
LOAD_STEPS = """
SELECT name, result::text AS result, finished_at IS NOT NULL AS done
FROM jobd.job_steps WHERE job_id = $1
"""

# Finished steps of many running attempts, in one statement. Fenced by the lease: a row
# whose attempt no longer holds its job (rescued, cancelled, finished) stores nothing.
# First completion wins: a step already finished keeps its result (a second row for the
# same step in one batch, from a handler running it twice at once, gets the first's).
# One output row per input row, in order: `live` false = the lease is gone; `result` =
# what is stored for that step now.
# $1 = job ids, $2 = lease tokens, $3 = step names, $4 = results (JSON text),
# $5 = attempts each took, $6 = how long each ran (s); all arrays of one length.
# The lease test is a primary-key probe per row: a LATERAL (OFFSET 0 keeps it one) and
# the state as {RUNNING}. With the literal, the generic plan asyncpg's prepared
# statement settles on probed the partial index of running jobs once per row, reading
# every running job each time (800 entries per row, 16 ms for 200 rows, where the probe
# takes 1.6), and as a plain join it hashed that whole index, the dead entries of jobs
# finished since the last vacuum included (29,000 for 200 rows).
SAVE_STEPS = f"""
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::int[],
                         $6::float8[]) WITH ORDINALITY
        AS x(job_id, token, name, result, attempts, duration_s, ord)
), live AS (
    SELECT i.* FROM input i
    CROSS JOIN LATERAL (SELECT 1 FROM jobd.jobs j
                        WHERE j.id = i.job_id AND j.lease_token = i.token
                          AND j.state = {RUNNING} OFFSET 0) j
), ins AS (
    INSERT INTO jobd.job_steps AS s (job_id, name, result, attempts, started_at, finished_at)
    SELECT DISTINCT ON (job_id, name) job_id, name, result::jsonb, attempts,
           now() - duration_s * interval '1 second', now()
    FROM live ORDER BY job_id, name, ord
    ON CONFLICT (job_id, name) DO UPDATE
        SET result = EXCLUDED.result, error = NULL, attempts = s.attempts + EXCLUDED.attempts,
            finished_at = EXCLUDED.finished_at
        WHERE s.finished_at IS NULL
    RETURNING s.job_id, s.name, s.result::text AS result
)
SELECT l.ord IS NOT NULL AS live,
       coalesce(ins.result, (SELECT s.result::text FROM jobd.job_steps s
                             WHERE s.job_id = i.job_id AND s.name = i.name)) AS result
FROM input i
LEFT JOIN live l ON l.ord = i.ord
LEFT JOIN ins ON ins.job_id = i.job_id AND ins.name = i.name
ORDER BY i.ord
"""

# A failed step execution: counted and kept for `jobctl get`; the step stays unfinished.
# $1 = job id, $2 = step name, $3 = error (JSON), $4 = attempts it took.
SAVE_STEP_ERROR = """
INSERT INTO jobd.job_steps AS s (job_id, name, error, attempts)
VALUES ($1, $2, $3::jsonb, $4)
ON CONFLICT (job_id, name) DO UPDATE
    SET error = EXCLUDED.error, attempts = s.attempts + EXCLUDED.attempts
    WHERE s.finished_at IS NULL
"""

# A sleep is a step finished "at" its wake-up time; the first call fixes that time.
# $1 = job id, $2 = step name, $3 = wake-up time (Unix seconds).
BEGIN_SLEEP = """
WITH ins AS (
    INSERT INTO jobd.job_steps (job_id, name, result, attempts, finished_at)
    VALUES ($1, $2, jsonb_build_object('until', $3::float8), 1, to_timestamp($3::float8))
    ON CONFLICT (job_id, name) DO NOTHING
    RETURNING result
)
SELECT (coalesce((SELECT result FROM ins),
                 (SELECT result FROM jobd.job_steps WHERE job_id = $1 AND name = $2))
        ->> 'until')::float8 AS until
"""

# Children and the step that records their ids, in one statement: either both exist or
# neither does. Ids are drawn up front so the step can hold them; a second run of the
# same spawn step (a zombie attempt) inserts nothing and gets the first run's ids.
# $1 = the parent's job id, $2 = step name, $3 = the children, a JSON
# array of NewJob (common.job_rows_json).
SPAWN_CHILDREN = f"""
WITH input AS (
    SELECT {NEXT_JOB_ID} AS id, x.* FROM {job_rows('$3')}
), step AS (
    INSERT INTO jobd.job_steps (job_id, name, result, attempts, finished_at)
    SELECT $1, $2, coalesce(jsonb_agg(id ORDER BY ord), '[]'::jsonb), 1, now() FROM input
    ON CONFLICT (job_id, name) DO NOTHING
    RETURNING result
), ins AS (
    INSERT INTO jobd.jobs (id, queue, kind, args, key, priority, run_at, state, max_attempts,
                           tags, timeout_s, cost, parent_id, traceparent)
    SELECT id, queue, kind, args::jsonb, key, priority,
           now() + coalesce(delay_s, 0) * interval '1 second',
           CASE WHEN coalesce(delay_s, 0) > 0 THEN 'scheduled' ELSE 'available' END,
           max_attempts, coalesce(tags, '{{}}'), timeout_s, coalesce(cost, 1), $1, traceparent
    FROM input WHERE EXISTS (SELECT 1 FROM step)
    ORDER BY ord
    RETURNING id
)
SELECT coalesce((SELECT result FROM step),
                (SELECT result FROM jobd.job_steps WHERE job_id = $1 AND name = $2))::text
       AS ids, (SELECT count(*) FROM ins) AS created
"""

# Record what the job will wait for (fenced by the lease token) and read the children.
# $1 = the parent's job id, $2 = its lease token, $3 = what it waits on
# (JSON), $4 = the children's ids.
GATHER_CHILDREN = f"""
WITH mark AS (
    UPDATE jobd.jobs SET waiting_on = $3::jsonb
    WHERE id = $1 AND lease_token = $2 AND state = {RUNNING}
    RETURNING id
)
SELECT c.id, c.kind, c.state, c.result::text AS result,
       (c.errors -> -1)::text AS error
FROM jobd.jobs c WHERE c.id = ANY($4::bigint[])
"""

# A wait for an event: its first call fixes `since` and the deadline (a pending step);
# the job's waiting_on is set; a matching event sent since then answers at once.
# $1 = job id, $2 = lease token, $3 = step name, $4 = event name,
# $5 = the match (a JSON object the event's data must contain),
# $6 = timeout (s; NULL: none).
BEGIN_WAIT = f"""
WITH pending AS (
    INSERT INTO jobd.job_steps (job_id, name, result, attempts)
    VALUES ($1, $3, jsonb_build_object(
        'since', extract(epoch FROM now())::float8,
        'deadline', extract(epoch FROM now())::float8 + $6::float8), 1)
    ON CONFLICT (job_id, name) DO NOTHING
    RETURNING result
), w AS (
    SELECT coalesce((SELECT result FROM pending),
                    (SELECT result FROM jobd.job_steps WHERE job_id = $1 AND name = $3)) AS r
), mark AS (
    UPDATE jobd.jobs j SET waiting_on = jsonb_build_object(
        'type', 'event', 'name', $4::text, 'match', $5::jsonb, 'step', $3::text,
        'since', w.r -> 'since', 'deadline', w.r -> 'deadline')
    FROM w WHERE j.id = $1 AND j.lease_token = $2 AND j.state = {RUNNING}
    RETURNING j.id
)
SELECT w.r::text AS wait,
       (SELECT e.data::text FROM jobd.events e
        WHERE e.name = $4 AND e.sent_at >= to_timestamp((w.r ->> 'since')::float8)
          AND e.data @> $5::jsonb
        ORDER BY e.id LIMIT 1) AS event,
       extract(epoch FROM now())::float8 AS now
FROM w
"""

# One event through jobd.send_event (migration 0019), which also wakes the waiters.
# $1 = event name, $2 = data (JSON).
SEND_EVENT = "SELECT event_id AS id, woken FROM jobd.send_event($1, $2::jsonb)"

# The safety net (reaper): waiting jobs whose condition holds or whose deadline passed.
# $1 = batch size.
WAKE_WAITING = """
UPDATE jobd.jobs j SET state = 'available', run_at = now()
WHERE j.id IN (SELECT id FROM jobd.jobs
               WHERE state = 'waiting' AND jobd.wait_satisfied(waiting_on)
               LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING j.id, pg_notify('jobd_enqueued', j.queue)
"""

# Workflow events (migration 0005) go once older than max_age, except one a live waiter
# may still read: an unfinished job whose wait (jobs.waiting_on, kept after the wake-up
# until the job re-runs and consumes the event) names it, began before it was sent and
# matches its data. The waiter test must stay in step with jobd.wait_satisfied().
# $1 = max age (s), $2 = batch size, $3 = now (NULL: the database's clock).
PRUNE_EVENTS = f"""
DELETE FROM jobd.events WHERE id = ANY(ARRAY(
    SELECT e.id FROM jobd.events e
    WHERE e.sent_at < coalesce($3::timestamptz, now()) - $1 * interval '1 second'
      AND NOT EXISTS (
          SELECT 1 FROM jobd.jobs j
          WHERE j.waiting_on ->> 'type' = 'event' AND j.state IN {UNFINISHED}
            AND j.waiting_on ->> 'name' = e.name
            AND coalesce(CASE WHEN jsonb_typeof(j.waiting_on -> 'since') = 'number'
                              THEN (j.waiting_on ->> 'since')::float8 END, '-Infinity')
                <= extract(epoch FROM e.sent_at)
            AND e.data @> coalesce(j.waiting_on -> 'match', '{{}}'::jsonb))
    ORDER BY e.sent_at
    LIMIT $2
    FOR UPDATE OF e SKIP LOCKED
))
"""

# $1 = the kinds that have a failure hook.
REGISTER_FAILURE_HOOKS = """
INSERT INTO jobd.failure_hooks (kind) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
"""

# `jobctl get`: a job's steps, children and what it waits for, in one round trip.
# $1 = job id.
WORKFLOW_DETAILS = """
SELECT
    (SELECT CASE WHEN state = 'waiting' THEN waiting_on::text END
     FROM jobd.jobs WHERE id = $1) AS waiting_on,
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
         'name', s.name, 'done', s.finished_at IS NOT NULL, 'attempts', s.attempts,
         'started_at', s.started_at, 'finished_at', s.finished_at, 'error', s.error,
         'result_bytes', octet_length(s.result::text))
         ORDER BY s.started_at, s.name), '[]')::text
     FROM jobd.job_steps s WHERE s.job_id = $1) AS steps,
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
         'id', c.id, 'kind', c.kind, 'state', c.state, 'attempt', c.attempt,
         'created_at', c.created_at, 'finished_at', c.finished_at) ORDER BY c.id), '[]')::text
     FROM (SELECT * FROM jobd.jobs WHERE parent_id = $1 ORDER BY id LIMIT 1000) c) AS children
"""
