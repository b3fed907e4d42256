"""The control plane's statements: one job filter, the pages and bulk operations over
it, and pauses."""

from __future__ import annotations

from daemon.store.sql.common import UNFINISHED, job_sizes

# Every filter is optional: a NULL parameter matches everything. $1..$12 are the
# filter, in protocol.commands.FILTER_FIELDS order; statements add theirs after it.
# $1 = ids, $2 = queue, $3 = kind, $4 = states, $5 = key, $6 = tag,
# $7 = unique key, $8/$9 = created at or after / before,
# $10/$11 = finished at or after / before, $12 = text in an attempt's error.
# The error text is compared with strpos, not LIKE, so % _ and \ in it match themselves
# ('' matches every job with an attempt error); errors not in jobd's shape (an array of
# objects; written by hand) match nothing rather than failing the statement. A job that
# never failed is passed over before its errors are unpacked (0.6 s -> 0.35 s for a text
# no job has in 1,000,000 rows, a tenth of them failed).
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
AND ($12::text IS NULL OR j.errors <> '[]' AND EXISTS (
    SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(j.errors) = 'array'
                                            THEN j.errors ELSE '[]' END) e
    WHERE jsonb_typeof(e) = 'object'
      AND strpos(lower(concat_ws(E'\n', e ->> 'message', e ->> 'traceback')), lower($12)) > 0))
"""

# A page of jobs: args, result and errors larger than $15 bytes are left out (NULL /
# empty) and a long progress_note is cut, all named in `truncated`, so one page of big
# values never becomes a reply over the frame cap (common.job_sizes).
# $1..$12 = the filter (JOB_FILTER), $13 = cursor (only ids below it; NULL:
# from the newest), $14 = page size, $15 = field size limit (bytes).
LIST_JOBS = f"""
SELECT j.id, j.queue, j.kind, CASE WHEN big.args THEN NULL ELSE j.args::text END AS args,
       j.key, j.priority, j.state, j.attempt, j.max_attempts, j.run_at, j.lease_owner,
       j.lease_until, j.timeout_s, j.unique_key, j.tags, j.parent_id, j.progress,
       CASE WHEN big.note THEN left(j.progress_note, $15 / 4) ELSE j.progress_note END
           AS progress_note,
       CASE WHEN big.result THEN NULL ELSE j.result::text END AS result,
       CASE WHEN big.errors THEN '[]' ELSE j.errors::text END AS errors,
       j.cancel_requested, j.created_at, j.started_at, j.finished_at,
       array_remove(ARRAY[CASE WHEN big.args THEN 'args' END,
                          CASE WHEN big.result THEN 'result' END,
                          CASE WHEN big.errors THEN 'errors' END,
                          CASE WHEN big.note THEN 'progress_note' END], NULL) AS truncated
FROM jobd.jobs j, {job_sizes('j', '$15')}
WHERE {JOB_FILTER} AND ($13::bigint IS NULL OR j.id < $13)
ORDER BY j.id DESC
LIMIT $14
"""

# $1..$12 = the filter (JOB_FILTER).
SUMMARIZE_JOBS = f"""
SELECT j.state, count(*) AS n FROM jobd.jobs j WHERE {JOB_FILTER} GROUP BY j.state
"""

# $13 = dry run: count what would change without changing it.
# $1..$12 = the filter (JOB_FILTER), $13 = dry run.
CANCEL_MATCHING = f"""
WITH matched AS (
    SELECT j.id, j.state, j.state = 'running' AND j.lease_owner IS NULL AS detached
    FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state IN {UNFINISHED}
    FOR UPDATE SKIP LOCKED
), queued AS (
    -- As CANCEL: a detached attempt (waiting for an HTTP callback) is cancelled now.
    UPDATE jobd.jobs j SET state = 'cancelled', finished_at = now(),
        lease_token = CASE WHEN m.detached THEN j.lease_token + 1 ELSE j.lease_token END,
        lease_until = NULL
    FROM matched m WHERE j.id = m.id AND (m.state <> 'running' OR m.detached) AND NOT $13
    RETURNING j.id
), running AS (
    UPDATE jobd.jobs j SET cancel_requested = true
    FROM matched m WHERE j.id = m.id AND m.state = 'running' AND NOT m.detached AND NOT $13
    RETURNING j.id, pg_notify('jobd_cancel', j.id::text)
)
SELECT (SELECT count(*) FROM matched) AS matched,
       (SELECT count(*) FROM queued) + (SELECT count(*) FROM running) AS changed
"""

# Attempts are topped up so a job that ran out can run once more.
# $1..$12 = the filter (JOB_FILTER), $13 = dry run.
RETRY_MATCHING = f"""
WITH matched AS (
    SELECT j.id FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state IN ('failed', 'cancelled', 'scheduled')
    FOR UPDATE SKIP LOCKED
), changed AS (
    UPDATE jobd.jobs j SET state = 'available', run_at = now(), finished_at = NULL,
        max_attempts = greatest(j.max_attempts, j.attempt + 1), cancel_requested = false
    FROM matched m WHERE j.id = m.id AND NOT $13
    RETURNING j.id
)
SELECT (SELECT count(*) FROM matched) AS matched, (SELECT count(*) FROM changed) AS changed
"""

# $1..$12 = the filter (JOB_FILTER), $13 = dry run.
REPLAY_MATCHING = f"""
WITH matched AS (
    SELECT j.* FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state IN ('completed', 'failed', 'cancelled')
    ORDER BY j.id
), created AS (
    INSERT INTO jobd.jobs (queue, kind, args, key, priority, max_attempts, tags, timeout_s,
                           parent_id)
    SELECT queue, kind, args, key, priority, max_attempts, tags, timeout_s, parent_id
    FROM matched WHERE NOT $13
    ORDER BY id
    RETURNING id
)
SELECT (SELECT count(*) FROM matched) AS matched,
       coalesce((SELECT array_agg(id ORDER BY id) FROM created), '{{}}') AS ids
"""

# $1..$12 = the filter (JOB_FILTER), $13 = dry run.
DELETE_MATCHING = f"""
WITH matched AS (
    SELECT j.id FROM jobd.jobs j
    WHERE {JOB_FILTER} AND j.state <> 'running'
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM jobd.jobs j USING matched m WHERE j.id = m.id AND NOT $13
    RETURNING j.id
)
SELECT (SELECT count(*) FROM matched) AS matched, (SELECT count(*) FROM deleted) AS changed
"""

# key '' is the whole queue (a primary key cannot hold NULL).
# $1 = queue, $2 = key (NULL: the whole queue).
PAUSE = """
WITH p AS (
    INSERT INTO jobd.pauses (queue, key) VALUES ($1, coalesce($2, ''))
    ON CONFLICT DO NOTHING RETURNING 1
)
SELECT pg_notify('jobd_paused', $1)
"""

# $1 = queue, $2 = key (NULL: the whole queue).
RESUME = """
WITH r AS (DELETE FROM jobd.pauses WHERE queue = $1 AND key = coalesce($2, '') RETURNING 1)
SELECT pg_notify('jobd_paused', $1)
"""

# No parameters.
LIST_PAUSES = "SELECT queue, key, paused_at FROM jobd.pauses ORDER BY queue, key"
