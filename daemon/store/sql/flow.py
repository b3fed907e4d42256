"""Flow control per key: the limited claim, the keys' state for `jobctl stats` and the
gauges, priority aging, and pruning keys back to their default (a missing row)."""

from __future__ import annotations

from daemon.store.sql.jobs import CLAIMED_COLUMNS

# The same claim under flow control: jobd.claim_flow (migration 0009) walks the queue's
# keys that have available jobs round robin and takes what every limit allows.
# $1 = queue, $2 = batch size, $3 = daemon id (the lease owner), $4 = lease
# length (s), $5 = now (NULL: the database's clock), $6 = the kinds this daemon has handlers for,
# $7 = paused keys, $8 = the queue's flow limits (JSON object).
CLAIM_FLOW = f"""
SELECT {CLAIMED_COLUMNS}
FROM jobd.claim_flow($1, $2, $3, $4, $6::text[], $7::text[], $5::timestamptz, $8::jsonb) j
"""

# Per key: what runs, what waits, and the bucket and breaker state (`jobctl stats`).
# Counted with one arm per partial index (jobs_available_by_key, jobs_scheduled_by_key,
# jobs_running_by_key): one `state IN (...)` pass matched none of them and scanned the
# whole table, 167 ms at 1,000,000 jobs against 3 ms (bench/dashboard_pages.py). A key
# whose row was pruned (it is in its default state) still shows while it has jobs.
# $1 = queue (NULL: every queue), $2 = how many keys.
KEY_STATS = """
WITH counts AS (
    SELECT queue, key, sum(running)::bigint AS running, sum(queued)::bigint AS queued
    FROM (SELECT queue, key, 0 AS running, count(*) AS queued FROM jobd.jobs
          WHERE state = 'available' AND key IS NOT NULL AND ($1::text IS NULL OR queue = $1)
          GROUP BY queue, key
          UNION ALL
          SELECT queue, key, 0, count(*) FROM jobd.jobs
          WHERE state = 'scheduled' AND key IS NOT NULL AND ($1::text IS NULL OR queue = $1)
          GROUP BY queue, key
          UNION ALL
          SELECT queue, key, count(*), 0 FROM jobd.jobs
          WHERE state = 'running' AND key IS NOT NULL AND ($1::text IS NULL OR queue = $1)
          GROUP BY queue, key) arms
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
# $1 = queue, $2 = aging period (s), $3 = priority floor,
# $4 = now (NULL: the database's clock), $5 = batch size.
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

# Idle flow keys: a row in its default state (no pause, breaker closed, full rate, full
# buckets) says nothing a missing row does not, so it goes once none of the key's jobs is
# available or running and the key has been idle (not served, not rate limited) for $2
# seconds; claims and finishes recreate it when the key is used again. A failure streak
# or a slowed adaptive rate is forgotten after $4 seconds without news.
# $1 = batch size, $2 = idle time (s), $3 = now (NULL: the database's clock),
# $4 = forget time (s) for a failure streak or a slowed rate.
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
