-- Every claim and finish changes `state`, so no update of a job is HOT: each row
-- version gets an entry in every index whose predicate it matches. Two indexes covered
-- every row and served only rare control-plane filters:
--   jobs_kind (kind, created_at): all rows of a kind share a few keys, and that
--     duplicate-heavy btree cost more per claim than the claim's own index scan;
--   jobs_tags (GIN): most jobs have no tags, yet each version added an empty entry.
-- Listing by kind walks the primary key like every other list; the tag index now holds
-- only tagged jobs, and the tag filter says `tags <> '{}'` so the planner may use it.
DROP INDEX jobd.jobs_kind;
DROP INDEX jobd.jobs_tags;
CREATE INDEX jobs_tags ON jobd.jobs USING gin (tags) WHERE tags <> '{}';

-- The per-key indexes serve flow control's per-key claims and running counts, which
-- always name a key; jobs without one (most jobs) need no entry in them.
DROP INDEX jobd.jobs_claimable_by_key;
CREATE INDEX jobs_claimable_by_key ON jobd.jobs (queue, key, priority, run_at, id)
    WHERE state IN ('available', 'scheduled') AND key IS NOT NULL;
DROP INDEX jobd.jobs_running_by_key;
CREATE INDEX jobs_running_by_key ON jobd.jobs (queue, key)
    WHERE state = 'running' AND key IS NOT NULL;
