"""Events that start functions (migration 0019): sending, subscriptions, the events list.

Every send goes through the SQL function jobd.send_event, whichever surface it came
from, so a send inside an application's transaction and one through the daemon do the
same thing."""

from __future__ import annotations

# Many events in one statement and one transaction, in order, through jobd.send_events
# (migration 0019: the batch's idempotency keys are locked in sorted order first, so two
# batches sharing keys cannot deadlock).
# $1 = names, $2 = data (JSON text), $3 = idempotency keys (NULL: none); one length.
SEND_EVENTS = """
SELECT s.event_id, s.created, s.started, s.started_kinds, s.cancelled, s.woken
FROM jobd.send_events($1::text[], $2::text[]::jsonb[], $3::text[]) s
ORDER BY s.n
"""

# This daemon's declarations replace its earlier ones. A row it no longer declares goes
# if it last declared it or runs its kind, and no other live daemon declares it.
# $1 = daemon id, $2 = declarations as a JSON array of objects (event, kind, action,
# match, fields, queue, priority, max_attempts, timeout_s, key_path), $3 = the kinds this
# daemon runs, $4 = seconds a daemon's heartbeat counts as live.
SYNC_SUBSCRIPTIONS = """
WITH declared AS (
    SELECT * FROM jsonb_to_recordset($2::jsonb) AS d(
        event text, kind text, action text, match jsonb, fields text[], queue text,
        priority smallint, max_attempts integer, timeout_s double precision, key_path text[])
), me AS (
    UPDATE jobd.daemons SET subscriptions = (
        SELECT coalesce(jsonb_agg(jsonb_build_array(event, kind, action)), '[]') FROM declared)
    WHERE id = $1
    RETURNING id
), kept AS (
    INSERT INTO jobd.event_subscriptions AS s (event, kind, action, match, fields, queue,
                                               priority, max_attempts, timeout_s, key_path,
                                               daemon_id, declared_at)
    SELECT event, kind, action, coalesce(match, '{}'), coalesce(fields, '{}'), queue,
           priority, max_attempts, timeout_s, key_path, $1, now()
    FROM declared
    ON CONFLICT (event, kind, action) DO UPDATE SET
        match = EXCLUDED.match, fields = EXCLUDED.fields, queue = EXCLUDED.queue,
        priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts,
        timeout_s = EXCLUDED.timeout_s, key_path = EXCLUDED.key_path,
        daemon_id = EXCLUDED.daemon_id, declared_at = EXCLUDED.declared_at
    RETURNING 1
), gone AS (
    DELETE FROM jobd.event_subscriptions s
    WHERE NOT EXISTS (SELECT 1 FROM declared d
                      WHERE d.event = s.event AND d.kind = s.kind AND d.action = s.action)
      AND (s.daemon_id = $1 OR s.kind = ANY ($3::text[]))
      AND NOT EXISTS (
          SELECT 1 FROM jobd.daemons o
          WHERE o.id <> $1 AND o.heartbeat_at > now() - $4 * interval '1 second'
            AND o.subscriptions @> jsonb_build_array(jsonb_build_array(s.event, s.kind, s.action)))
    RETURNING 1
)
SELECT (SELECT count(*) FROM kept) AS kept, (SELECT count(*) FROM gone) AS removed,
       (SELECT count(*) FROM me) AS registered
"""

# What `jobctl events list` shows: data over the field limit is left out (named).
# $1 = name (NULL: any), $2 = cursor (an event id; older ones come next), $3 = limit,
# $4 = field bytes.
LIST_EVENTS = """
SELECT e.id, e.name, e.idempotency_key, e.sent_at, e.jobs,
       CASE WHEN octet_length(e.data::text) <= $4 THEN e.data::text END AS data
FROM jobd.events e
WHERE ($1::text IS NULL OR e.name = $1) AND ($2::bigint IS NULL OR e.id < $2)
ORDER BY e.id DESC
LIMIT $3
"""

# Expired idempotency keys, oldest first, a batch at a time.
# $1 = batch size, $2 = now (NULL: the database's clock).
PRUNE_EVENT_KEYS = """
DELETE FROM jobd.event_keys WHERE key = ANY(ARRAY(
    SELECT key FROM jobd.event_keys
    WHERE expires_at <= coalesce($2::timestamptz, now())
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
"""

# Every subscription the daemons declared, for inspection (tests, debugging).
LIST_SUBSCRIPTIONS = """
SELECT event, kind, action, match::text AS match, fields, queue, key_path, daemon_id
FROM jobd.event_subscriptions ORDER BY event, kind, action
"""
