"""The schedule statements.

Definition changes NOTIFY `jobd_schedules` so every daemon's scheduler re-reads them.
"""

from __future__ import annotations

from daemon.store.sql.common import NEXT_JOB_ID, UNFINISHED

SCHEDULE_COLUMNS = """
s.name, s.kind, s.cron, s.every_s, s.tz, s.args::text AS args, s.queue, s.key, s.priority,
s.max_attempts, s.timeout_s, s.tags, s.jitter_s, s.missed, s.missed_limit, s.grace_s,
s.paused, s.source, s.revision, s.handled_until, s.last_fire_at, s.last_job_id,
s.created_at, s.updated_at
"""

_DEFINITION_COLUMNS = (
    "kind", "cron", "every_s", "tz", "args", "queue", "key", "priority", "max_attempts",
    "timeout_s", "tags", "jitter_s", "missed", "missed_limit", "grace_s",
)

_DEFINITION = ", ".join(_DEFINITION_COLUMNS)

_CHANGED = (
    "ROW(" + ", ".join(f"s.{c}" for c in _DEFINITION_COLUMNS) + ") IS DISTINCT FROM ROW("
    + ", ".join(f"EXCLUDED.{c}" for c in _DEFINITION_COLUMNS) + ")"
)

# $1 = name, $2 = kind, $3 = cron, $4 = every_s, $5 = tz, $6 = args (JSON),
# $7 = queue, $8 = key, $9 = priority, $10 = max_attempts, $11 = timeout_s,
# $12 = tags, $13 = jitter_s, $14 = missed, $15 = missed_limit, $16 = grace_s,
# $17 = source, $18 = paused, $19 = now (NULL: the database's clock); ScheduleDef's fields.
_VALUES = """
$1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12::text[], $13, $14, $15, $16, $17,
$18, coalesce($19::timestamptz, now()), coalesce($19::timestamptz, now()),
coalesce($19::timestamptz, now())
"""

_INSERT = f"""
INSERT INTO jobd.schedules AS s (name, {_DEFINITION}, source, paused, handled_until,
                                 created_at, updated_at)
VALUES ({_VALUES})
"""

# A run-time add: refused (no row) when the name exists.
# Parameters: _VALUES.
INSERT_SCHEDULE = f"""
{_INSERT}
ON CONFLICT (name) DO NOTHING
RETURNING {SCHEDULE_COLUMNS}, pg_notify('jobd_schedules', s.name) IS NULL AS _n
"""

# Config at start (and `add --replace`): the definition is overwritten; paused state and
# fire history stay. A changed definition applies from now on: the watermark moves to
# now so the new timing does not "catch up" on occurrences it never had.
# Parameters: _VALUES.
UPSERT_SCHEDULE = f"""
{_INSERT}
ON CONFLICT (name) DO UPDATE SET
    kind = EXCLUDED.kind, cron = EXCLUDED.cron, every_s = EXCLUDED.every_s, tz = EXCLUDED.tz,
    args = EXCLUDED.args, queue = EXCLUDED.queue, key = EXCLUDED.key,
    priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts,
    timeout_s = EXCLUDED.timeout_s, tags = EXCLUDED.tags, jitter_s = EXCLUDED.jitter_s,
    missed = EXCLUDED.missed, missed_limit = EXCLUDED.missed_limit, grace_s = EXCLUDED.grace_s,
    source = EXCLUDED.source,
    revision = s.revision + CASE WHEN {_CHANGED} THEN 1 ELSE 0 END,
    handled_until = CASE WHEN {_CHANGED}
        THEN greatest(s.handled_until, EXCLUDED.handled_until) ELSE s.handled_until END,
    updated_at = EXCLUDED.updated_at
RETURNING {SCHEDULE_COLUMNS}, pg_notify('jobd_schedules', s.name) IS NULL AS _n
"""

# $1 = name.
DELETE_SCHEDULE = """
DELETE FROM jobd.schedules s WHERE name = $1
RETURNING s.name, pg_notify('jobd_schedules', s.name) IS NULL AS _n
"""

# Resuming does not fire what came due while paused: the watermark moves to now.
# $1 = name, $2 = paused, $3 = now (NULL: the database's clock).
SET_SCHEDULE_PAUSED = f"""
UPDATE jobd.schedules s SET
    paused = $2, updated_at = coalesce($3::timestamptz, now()),
    handled_until = CASE WHEN $2 THEN s.handled_until
                         ELSE greatest(s.handled_until, coalesce($3::timestamptz, now())) END
WHERE name = $1
RETURNING {SCHEDULE_COLUMNS}, pg_notify('jobd_schedules', s.name) IS NULL AS _n
"""

# Every schedule plus the database's clock (one row with NULLs when there are none):
# all daemons compute due occurrences on that one clock.
# $1 = now (NULL: the database's clock).
LIST_SCHEDULES = f"""
SELECT c.now AS db_now, {SCHEDULE_COLUMNS}
FROM (SELECT coalesce($1::timestamptz, now()) AS now) c
LEFT JOIN jobd.schedules s ON true
ORDER BY s.name
"""

# $1 = name, $2 = now (NULL: the database's clock).
GET_SCHEDULE = f"""
SELECT c.now AS db_now, {SCHEDULE_COLUMNS}
FROM (SELECT coalesce($2::timestamptz, now()) AS now) c
JOIN jobd.schedules s ON s.name = $1
"""

# One statement fires a batch of occurrences across schedules, exactly once each:
# - the schedules are locked (in name order, so concurrent daemons cannot deadlock); a
#   daemon that waited reads the winner's watermark, since FOR UPDATE returns the
#   newest row version;
# - a schedule fires only at the revision the caller computed from, and not while
#   paused (a manual trigger, advance_to NULL, may fire a paused one);
# - regular occurrences must lie past the watermark; every occurrence needs a new
#   (schedule, fire_at) row, and its job is inserted only when that row was;
# - the watermark and last fire only move forward.
# $18 is each occurrence job's cost (its handler's `cost` on the args; after $17, `now`).
# Returns the fired occurrences, plus a 'stale' row per schedule that was refused.
# $1..$3 = the targets (parallel arrays): name, revision, advance_to;
# $4..$16 = the occurrences (parallel arrays): schedule, fire_at, manual,
# then their job's kind, args (JSON), queue, key, priority, max_attempts,
# tags (each an array literal), timeout_s, delay_s, unique_key;
# $17 = now (NULL: the database's clock).
FIRE_SCHEDULES = f"""
WITH target AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::timestamptz[])
        AS t(name, revision, advance_to)
), locked AS (
    SELECT s.name, s.revision, s.paused, s.handled_until FROM jobd.schedules s
    WHERE s.name = ANY($1::text[])
    ORDER BY s.name
    FOR UPDATE
), ok AS (
    SELECT t.name, t.advance_to, l.handled_until FROM target t JOIN locked l USING (name)
    WHERE l.revision = t.revision AND (NOT l.paused OR t.advance_to IS NULL)
), occ AS (
    SELECT {NEXT_JOB_ID} AS job_id, o.*
    FROM unnest($4::text[], $5::timestamptz[], $6::bool[], $7::text[], $8::text[], $9::text[],
                $10::text[], $11::int[], $12::int[], $13::text[], $14::double precision[],
                $15::double precision[], $16::text[], $18::int[])
         AS o(schedule, fire_at, manual, kind, args, queue, key, priority, max_attempts, tags,
              timeout_s, delay_s, unique_key, cost)
    JOIN ok ON ok.name = o.schedule
    WHERE o.manual OR o.fire_at > ok.handled_until
), fired AS (
    INSERT INTO jobd.schedule_fires (schedule, fire_at, job_id, manual, fired_at)
    SELECT schedule, fire_at, job_id, manual, coalesce($17::timestamptz, now()) FROM occ
    ON CONFLICT DO NOTHING
    RETURNING schedule, fire_at, job_id
), timed AS (
    SELECT o.*, CASE WHEN o.manual THEN coalesce($17::timestamptz, now())
                     ELSE o.fire_at + coalesce(o.delay_s, 0) * interval '1 second' END AS run_at
    FROM fired f JOIN occ o USING (job_id)
), jobs AS (
    INSERT INTO jobd.jobs (id, queue, kind, args, key, unique_key, priority, run_at, state,
                           max_attempts, tags, timeout_s, cost)
    SELECT job_id, queue, kind, args::jsonb, key, unique_key, priority, run_at,
           CASE WHEN run_at > coalesce($17::timestamptz, now()) THEN 'scheduled'
                ELSE 'available' END,
           max_attempts, coalesce(tags::text[], '{{}}'), timeout_s, coalesce(cost, 1)
    FROM timed
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN {UNFINISHED}
    DO NOTHING
    RETURNING id
), advanced AS (
    UPDATE jobd.schedules s SET
        handled_until = greatest(s.handled_until, ok.advance_to),
        last_fire_at = greatest(s.last_fire_at, lf.fire_at),
        last_job_id = CASE WHEN lf.fire_at >= coalesce(s.last_fire_at, '-infinity')
                           THEN lf.job_id ELSE s.last_job_id END
    FROM ok LEFT JOIN LATERAL (
        SELECT f.fire_at, f.job_id FROM fired f WHERE f.schedule = ok.name
        ORDER BY f.fire_at DESC LIMIT 1
    ) lf ON true
    WHERE s.name = ok.name
    RETURNING s.name
)
SELECT 'fired' AS status, f.schedule, f.fire_at, f.job_id FROM fired f
UNION ALL
SELECT 'stale', t.name, NULL, NULL FROM target t
WHERE NOT EXISTS (SELECT 1 FROM ok WHERE ok.name = t.name)
"""

# Fire rows only guard against a second fire while the watermark has not yet passed
# the occurrence; after that they are history. Small batches keep locks short.
# $1 = how long (s) to keep fire rows, $2 = batch size, $3 = now (NULL: the database's clock).
PRUNE_SCHEDULE_FIRES = """
DELETE FROM jobd.schedule_fires WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM jobd.schedule_fires
    WHERE fired_at < coalesce($3::timestamptz, now()) - $1 * interval '1 second'
    LIMIT $2))
"""
