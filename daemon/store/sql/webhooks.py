"""Completion webhooks: syncing a daemon's subscriptions, and the outbox the finish
trigger fills (migration 0017) that the courier claims, records and prunes."""

from __future__ import annotations

# $1 = daemon id, $2 = its [[webhooks]] as a JSON array of {name, events, kinds, queues}.
SYNC_WEBHOOKS = "SELECT jobd.sync_webhooks($1, $2::jsonb)"

# Due rows of the webhooks this daemon delivers, at most $3[i] of webhook $2[i] (its
# free concurrency), oldest due first. The claim pushes next_attempt_at past the
# request: that is the row's lease (a daemon killed mid-request leaves it due again
# then), and another daemon's claim skips it meanwhile.
# $1 = daemon id, $2 = webhook names, $3 = how many of each, $4 = lease (s),
# $5 = now (NULL: the database's clock).
CLAIM_DELIVERIES = """
UPDATE jobd.webhook_outbox o SET
    attempts = o.attempts + 1, claimed_by = $1,
    last_attempt_at = coalesce($5::timestamptz, now()),
    next_attempt_at = coalesce($5::timestamptz, now()) + $4 * interval '1 second'
WHERE o.id = ANY(ARRAY(
    SELECT c.id FROM unnest($2::text[], $3::int[]) AS w(name, n)
    CROSS JOIN LATERAL (
        SELECT id FROM jobd.webhook_outbox
        WHERE state = 'pending' AND webhook = w.name
          AND next_attempt_at <= coalesce($5::timestamptz, now())
        ORDER BY next_attempt_at, id
        LIMIT w.n
        FOR UPDATE SKIP LOCKED
    ) c
))
RETURNING o.id, o.webhook, o.event, o.job_id, o.payload::text AS payload, o.attempts,
          extract(epoch FROM coalesce($5::timestamptz, now()) - o.retry_from)::float8
              AS age_s
"""

# Seconds until the next row of these webhooks is due (NULL: none pending).
# $1 = webhook names, $2 = now (NULL: the database's clock).
NEXT_DELIVERY_DUE = """
SELECT extract(epoch FROM min(next_attempt_at) - coalesce($2::timestamptz, now()))::float8
FROM jobd.webhook_outbox WHERE state = 'pending' AND webhook = ANY($1::text[])
"""

# Each attempt's outcome: 'delivered', 'pending' again after $4 s, or 'failed'. A retry
# or failure applies only to the attempt that claimed the row last ($2, fencing one
# whose lease ran out); a delivery always does: the receiver has it.
# $1 = ids, $2 = the attempt numbers claimed, $3 = states, $4 = delays (s),
# $5 = HTTP statuses (NULL: no response), $6 = errors (NULL on delivery),
# $7 = now (NULL: the database's clock).
RECORD_DELIVERIES = """
UPDATE jobd.webhook_outbox o SET
    state = r.state,
    next_attempt_at = CASE WHEN r.state = 'pending'
        THEN coalesce($7::timestamptz, now()) + r.delay_s * interval '1 second'
        ELSE o.next_attempt_at END,
    finished_at = CASE WHEN r.state <> 'pending' THEN coalesce($7::timestamptz, now()) END,
    last_status = r.status, last_error = r.error
FROM unnest($1::bigint[], $2::int[], $3::text[], $4::float8[], $5::int[], $6::text[])
    AS r(id, attempts, state, delay_s, status, error)
WHERE o.id = r.id AND o.state = 'pending'
  AND (o.attempts = r.attempts OR r.state = 'delivered')
"""

# A page, newest first. $1 = state (NULL: any), $2 = webhook (NULL: any),
# $3 = cursor (ids below it; NULL: from the newest), $4 = page size.
LIST_DELIVERIES = """
SELECT id, webhook, event, job_id, state, attempts, created_at, next_attempt_at,
       last_attempt_at, last_status, last_error, finished_at
FROM jobd.webhook_outbox
WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR webhook = $2)
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC
LIMIT $4
"""

# Make delivered or failed rows due now with a fresh retry window: by id ($1), or every
# failed row ($2 = true). Only rows of a webhook some daemon still declares (nobody
# could deliver the others); a pending row is left to its retries (an attempt may be in
# flight, and its record is fenced by the attempt number this resets). Returns the ids
# replayed.
# $1 = ids (NULL: none by id), $2 = every failed row, $3 = now (NULL: the database's clock).
REPLAY_DELIVERIES = """
UPDATE jobd.webhook_outbox o SET
    state = 'pending', next_attempt_at = coalesce($3::timestamptz, now()),
    retry_from = coalesce($3::timestamptz, now()), finished_at = NULL, attempts = 0
WHERE (o.id = ANY($1::bigint[]) OR ($2 AND o.state = 'failed')) AND o.state <> 'pending'
  AND EXISTS (SELECT 1 FROM jobd.webhooks w WHERE w.name = o.webhook)
RETURNING o.id, o.webhook
"""

# Delivered and failed rows past their webhook's retention, a batch at a time; rows of
# a webhook this daemon does not declare go after $5 (their own daemon prunes them
# sooner). $1 = webhook names, $2 = delivered max age (s), $3 = failed max age (s),
# $4 = batch size, $5 = max age (s) of other webhooks' rows,
# $6 = now (NULL: the database's clock).
PRUNE_DELIVERIES = """
DELETE FROM jobd.webhook_outbox o WHERE o.id = ANY(ARRAY(
    SELECT x.id FROM jobd.webhook_outbox x
    LEFT JOIN unnest($1::text[], $2::float8[], $3::float8[]) AS w(name, delivered_s, failed_s)
        ON w.name = x.webhook
    WHERE x.state <> 'pending'
      AND x.finished_at < coalesce($6::timestamptz, now()) - coalesce(
          CASE x.state WHEN 'delivered' THEN w.delivered_s ELSE w.failed_s END, $5)
          * interval '1 second'
    LIMIT $4
    FOR UPDATE OF x SKIP LOCKED
))
"""

# The backlog gauges: pending rows per webhook and the oldest one's age (s).
# $1 = webhook names, $2 = now (NULL: the database's clock).
DELIVERY_BACKLOG = """
SELECT webhook, count(*) AS pending,
       extract(epoch FROM coalesce($2::timestamptz, now()) - min(retry_from))::float8 AS oldest_s
FROM jobd.webhook_outbox WHERE state = 'pending' AND webhook = ANY($1::text[])
GROUP BY webhook
"""
