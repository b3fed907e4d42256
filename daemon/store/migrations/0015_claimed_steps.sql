-- A workflow's stored steps come back with its claim (sql/jobs.py CLAIMED_COLUMNS), so a
-- resumed run loads nothing. Only jobs marked here pay for the read: the finish of an
-- attempt that touched steps sets the mark (FINISH_MANY), plain jobs never have it.
-- A hint, never a promise: a job whose steps were stored by an attempt that crashed
-- before its finish is unmarked and loads its steps the old way, in one query.
-- A constant default: no table rewrite.
ALTER TABLE jobd.jobs ADD COLUMN has_steps boolean NOT NULL DEFAULT false;
