"""What the dashboard reads that `get` and `stats` do not give: one run in detail, and the
last hour's activity per queue (actors/services/run_views.py)."""

from __future__ import annotations

from daemon.store.sql.common import job_sizes, over
from daemon.store.sql.jobs import JOB_COLUMNS

# One run in one round trip: the job's own columns (as GET_JOB), and as JSON text its
# steps (result and error over $2 bytes left out, named in `truncated`; a sleep is done
# once its wake-up time has passed, and as its record can be written after the handler
# fixed that time, a duration is never below zero), its first $3
# children as list rows (LIST_JOBS' shape and cuts), the event that started it.
# $1 = job id, $2 = field size limit (bytes), $3 = children at most, $4 = steps at most.
INSPECT_RUN = f"""
SELECT {JOB_COLUMNS},
    CASE WHEN state = 'waiting' THEN waiting_on::text END AS waiting_on,
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
         'name', s.name, 'done', coalesce(s.finished_at <= now(), false), 'attempts', s.attempts,
         'started_at', s.started_at, 'finished_at', s.finished_at,
         'duration_s', CASE WHEN s.finished_at <= now() THEN
             greatest(extract(epoch FROM s.finished_at - s.started_at), 0) END,
         'result', CASE WHEN s.result_big THEN NULL ELSE s.result END,
         'error', CASE WHEN s.error_big THEN NULL ELSE s.error END,
         'truncated', to_jsonb(array_remove(ARRAY[CASE WHEN s.result_big THEN 'result' END,
                                                  CASE WHEN s.error_big THEN 'error' END],
                                            NULL)))
         ORDER BY s.started_at, s.name), '[]')::text
     FROM (SELECT st.*, {over('st.result', '$2')} AS result_big,
                  {over('st.error', '$2')} AS error_big
           FROM jobd.job_steps st WHERE st.job_id = $1
           ORDER BY st.started_at, st.name LIMIT $4) s) AS steps,
    (SELECT count(*) FROM jobd.job_steps st WHERE st.job_id = $1) AS steps_total,
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
         'id', c.id, 'queue', c.queue, 'kind', c.kind,
         'args', CASE WHEN big.args THEN NULL ELSE c.args::text END,
         'key', c.key, 'priority', c.priority, 'state', c.state, 'attempt', c.attempt,
         'max_attempts', c.max_attempts, 'run_at', c.run_at, 'lease_owner', c.lease_owner,
         'lease_until', c.lease_until, 'unique_key', c.unique_key, 'tags', c.tags,
         'progress', c.progress,
         'progress_note', CASE WHEN big.note THEN left(c.progress_note, $2 / 4)
                               ELSE c.progress_note END,
         'result', CASE WHEN big.result THEN NULL ELSE c.result::text END,
         'errors', CASE WHEN big.errors THEN '[]' ELSE c.errors::text END,
         'cancel_requested', c.cancel_requested, 'created_at', c.created_at,
         'started_at', c.started_at, 'finished_at', c.finished_at, 'event_id', c.event_id,
         'truncated', to_jsonb(array_remove(ARRAY[CASE WHEN big.args THEN 'args' END,
                                                  CASE WHEN big.result THEN 'result' END,
                                                  CASE WHEN big.errors THEN 'errors' END,
                                                  CASE WHEN big.note THEN 'progress_note' END],
                                            NULL)))
         ORDER BY c.id), '[]')::text
     FROM (SELECT * FROM jobd.jobs ch WHERE ch.parent_id = $1 ORDER BY ch.id LIMIT $3) c,
          {job_sizes('c', '$2')}) AS children,
    (SELECT count(*) FROM jobd.jobs ch WHERE ch.parent_id = $1) AS children_total,
    (SELECT jsonb_build_object('id', e.id, 'name', e.name, 'sent_at', e.sent_at)::text
     FROM jobd.events e WHERE e.id = jobs.event_id) AS event
FROM jobd.jobs WHERE id = $1
"""

# The last $2 buckets of $1 seconds, aligned to $1 (the last one holds now), per queue:
# completed and failed counts (jobs_finished: state, finished_at), and each queue's head:
# the due job (available, or scheduled with run_at passed) with the oldest run_at. The
# heads come from jobs_claimable (queue, priority, run_at, id) without walking it: a skip
# over its distinct (queue, priority) lanes, then the first due row of each lane; a lane
# of a million rows costs two index probes, not a million.
# $1 = bucket length (s), $2 = buckets.
ACTIVITY = """
WITH RECURSIVE w AS (
    SELECT now() AS now,
           date_bin($1::float8 * interval '1 second', now(), timestamptz 'epoch')
               - ($2::int - 1) * $1::float8 * interval '1 second' AS since
), finished AS (
    SELECT j.queue, j.state,
           floor(extract(epoch FROM j.finished_at - w.since)::float8 / $1::float8)::int
               AS bucket,
           count(*) AS n
    FROM jobd.jobs j, w
    WHERE j.state IN ('completed', 'failed') AND j.finished_at >= w.since
      AND j.finished_at < w.since + $2::int * $1::float8 * interval '1 second'
    GROUP BY 1, 2, 3
), lanes AS (
    (SELECT j.queue, j.priority FROM jobd.jobs j WHERE j.state IN ('available', 'scheduled')
     ORDER BY j.queue, j.priority LIMIT 1)
    UNION ALL
    SELECT n.queue, n.priority FROM lanes l, LATERAL (
        SELECT j.queue, j.priority FROM jobd.jobs j
        WHERE j.state IN ('available', 'scheduled')
          AND (j.queue, j.priority) > (l.queue, l.priority)
        ORDER BY j.queue, j.priority LIMIT 1) n
), heads AS (
    SELECT DISTINCT ON (h.queue) h.queue, h.id, h.run_at
    FROM lanes l, w, LATERAL (
        SELECT j.queue, j.id, j.run_at FROM jobd.jobs j
        WHERE j.state IN ('available', 'scheduled') AND j.queue = l.queue
          AND j.priority = l.priority AND j.run_at <= w.now
        ORDER BY j.run_at, j.id LIMIT 1) h
    ORDER BY h.queue, h.run_at, h.id
)
SELECT w.now, w.since,
    (SELECT coalesce(jsonb_agg(jsonb_build_array(f.queue, f.state, f.bucket, f.n)), '[]')
     FROM finished f)::text AS finished,
    (SELECT coalesce(jsonb_agg(jsonb_build_array(h.queue, h.id, h.run_at)), '[]')
     FROM heads h)::text AS heads
FROM w
"""
