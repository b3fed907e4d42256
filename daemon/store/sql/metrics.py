"""The metrics leader's statements: one leader per database computes the queue gauges
(daemon.metrics), on a session that holds the advisory lock."""

from __future__ import annotations

METRICS_LEADER_LOCK = 0x6A6F6264_6D657472  # "jobd" "metr": a session lock, never released by SQL

# $1 = the lock (METRICS_LEADER_LOCK).
TRY_METRICS_LEADER = "SELECT pg_try_advisory_lock($1)"

# One arm per partial index (jobs_claimable, jobs_leases, jobs_finished, jobs_skipped of
# migration 0020), so no arm
# scans the whole table; 'waiting' has no index yet and is not counted.
# No parameters.
QUEUE_COUNTS = """
SELECT queue, state, count(*) AS n FROM jobd.jobs
WHERE state IN ('available', 'scheduled') GROUP BY queue, state
UNION ALL
SELECT queue, state, count(*) FROM jobd.jobs WHERE state = 'running' GROUP BY queue, state
UNION ALL
SELECT queue, state, count(*) FROM jobd.jobs
WHERE state IN ('completed', 'failed', 'cancelled') GROUP BY queue, state
UNION ALL
SELECT queue, state, count(*) FROM jobd.jobs WHERE state = 'skipped' GROUP BY queue, state
"""

# Claimable = available, or scheduled and already due (the claim takes both).
# $1 = now (NULL: the database's clock).
QUEUE_OLDEST_AVAILABLE = """
SELECT queue,
       extract(epoch FROM coalesce($1::timestamptz, now()) - min(run_at))::float8 AS age_s
FROM jobd.jobs
WHERE state IN ('available', 'scheduled') AND run_at <= coalesce($1::timestamptz, now())
GROUP BY queue
"""
