-- The jobs table churns: every job is inserted, updated a few times and deleted by
-- retention. Postgres' default thresholds (20 % of the table) let dead tuples pile up
-- far past the live rows; vacuum the queue's table early and without throttling.
ALTER TABLE jobd.jobs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
