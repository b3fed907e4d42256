-- `stats` (the dashboard's overview, every refresh) and the metrics leader count jobs
-- per queue and state. For finished jobs (most of the table) they had only
-- jobs_finished (state, finished_at), which lacks the queue: counting meant a scan of
-- the whole table (270 ms at 1,000,000 jobs, bench/dashboard_pages.py). With the queue
-- carried in the index the count is an index-only scan, and so is a per-queue count of
-- the last hour's finishes (a range of finished_at).
-- The finish path writes the same entries as before (one per finished row version;
-- enqueues and claims never match the predicate), each a queue name wider.
-- Built under the migration's lock: writes to jobd.jobs wait about a second per
-- million finished jobs.
DROP INDEX jobd.jobs_finished;
CREATE INDEX jobs_finished ON jobd.jobs (state, finished_at) INCLUDE (queue)
    WHERE state IN ('completed', 'failed', 'cancelled');
