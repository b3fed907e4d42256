"""Daemons and the leases they hold: registration, the heartbeat that renews every lease
in one statement, and the reaper's rescue of leases nobody renews."""

from __future__ import annotations

# $1 = daemon id, $2 = region, $3 = host, $4 = pid, $5 = jobd version.
REGISTER_DAEMON = """
INSERT INTO jobd.daemons (id, region, host, pid, version, status)
VALUES ($1, $2, $3, $4, $5, 'starting')
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), status = 'starting'
"""

# One statement per interval renews the daemon's heartbeat and every lease it holds.
# Returns the attempts ($6 ids, $7 lease tokens) it could NOT renew: their lease is gone
# (rescued after a stall, reclaimed, finished elsewhere), so the daemon stops them.
# $1 = daemon id, $2 = lease length (s), $3 = status, $4 = draining,
# $5 = now (NULL: the database's clock), $6 = ids of the attempts still running here (NULL: every
# job the daemon owns), $7 = their lease tokens (parallel to $6).
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

# $1 = daemon id.
DEREGISTER_DAEMON = "DELETE FROM jobd.daemons WHERE id = $1"

# The queues a daemon serves (at start and after a reload), so an enqueue or a pause can
# tell a queue nobody serves (a typo) from one served elsewhere.
# $1 = daemon id, $2 = the queues it serves.
SET_DAEMON_QUEUES = "UPDATE jobd.daemons SET queues = $2::text[] WHERE id = $1"

# $1 = how recent (s) a heartbeat must be for its daemon to count as live.
LIVE_QUEUES = """
SELECT DISTINCT unnest(queues) AS queue FROM jobd.daemons
WHERE heartbeat_at > now() - $1 * interval '1 second'
"""

# Limits jobd.enqueue (SQL, migration 0008) cannot read from the TOML: each daemon writes
# its own at start, so the function applies what the daemons apply.
# $1 = the settings, a JSON object of name to value.
PUT_SETTINGS = """
INSERT INTO jobd.settings (name, value, updated_at)
SELECT key, value, now() FROM jsonb_each($1::jsonb)
ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
"""

# What the daemons wrote with PUT_SETTINGS, for a producer that enqueues without one
# (daemon/producer.py applies their limits.max_args_bytes and liveness window).
# $1 = the names wanted.
GET_SETTINGS = """
SELECT name, value::text AS value FROM jobd.settings WHERE name = ANY($1::text[])
"""

# No parameters.
LIST_DAEMONS = """
SELECT id, region, host, pid, version, started_at, heartbeat_at, draining, status
FROM jobd.daemons ORDER BY region, started_at
"""

# $1 = seconds without a heartbeat, $2 = now (NULL: the database's clock).
FORGET_DEAD_DAEMONS = """
DELETE FROM jobd.daemons
WHERE heartbeat_at < coalesce($2::timestamptz, now()) - $1 * interval '1 second'
"""

# Expired leases: the daemon holding them is gone (or cut off from the database), or,
# for a running job no daemon holds (an HTTP handler's attempt detached after a 202),
# its callback did not come by the deadline: a timed-out attempt.
# Bumping the token fences the lost attempt out (and kills its callback token).
# $1 = batch size, $2 = now (NULL: the database's clock).
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
        'attempt', j.attempt, 'at', coalesce($2::timestamptz, now()),
        'class', CASE WHEN j.lease_owner IS NULL THEN 'timeout' ELSE 'rescued' END,
        'message', CASE WHEN j.lease_owner IS NULL
                        THEN 'no callback by its deadline (the endpoint answered 202)'
                        ELSE 'lease expired (daemon ' || j.lease_owner || ' stopped renewing)' END,
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
# $1 = batch size, $2 = grace (s) past the timeout, $3 = now (NULL: the database's clock).
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
    -- A detached attempt (no lease owner: waiting for its callback) has its own
    -- deadline in lease_until; the request's timeout is long past.
    WHERE state = 'running' AND timeout_s IS NOT NULL AND lease_owner IS NOT NULL
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
