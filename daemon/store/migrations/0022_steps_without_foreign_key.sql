-- A step row no longer checks its job through a foreign key (performance issue,
-- "workflows without extra round trips"; README Performance).
--
-- The check ran per inserted step: a probe of jobs' primary key and a FOR KEY SHARE
-- lock on the job's row. Writing the steps of 200 running workflows in one statement
-- took 2.2-2.9 ms of execution, 0.72-0.84 ms of it in the constraint's trigger, and
-- 1.5-2.2 ms without it (bench/step_write_bench.py). Every path that inserts a step
-- comes from an attempt of a job that exists (SAVE_STEPS joins it on its lease; a
-- finish inserts the steps of the rows it updated; a spawn, a sleep, a wait or a
-- step's error comes from a running handler), so the check only ever held off a
-- delete racing such an insert, and no delete takes a running job (retention takes
-- finished ones, `jobctl delete` skips running ones).
-- What such a race can still leave, a step of a job that is gone, is a row nothing
-- reads: ids are never reused.
--
-- ON DELETE CASCADE was the other half of the key: a job's steps go with it. A
-- statement-level trigger does that now, once per DELETE (retention deletes batches),
-- not once per deleted job. TRUNCATE fires no delete trigger: truncate job_steps with
-- jobs (the benchmarks and tests do).
ALTER TABLE jobd.job_steps DROP CONSTRAINT job_steps_job_id_fkey;

CREATE FUNCTION jobd.delete_steps() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- = ANY(ARRAY(...)): a transition table has no statistics, and a join with it may
    -- be planned as a scan of every step; this is a primary-key probe per deleted job.
    DELETE FROM jobd.job_steps WHERE job_id = ANY(ARRAY(SELECT id FROM gone));
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_delete_steps AFTER DELETE ON jobd.jobs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION jobd.delete_steps();
