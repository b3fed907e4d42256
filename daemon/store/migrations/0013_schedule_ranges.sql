-- Schedules: the scheduler does date arithmetic with these values, and a row out of
-- range (every = 1e308, grace = 1e16, a NaN) crashed it under root until jobd exited,
-- again on every restart. The ranges match protocol/schedules.py (README "Schedules");
-- NaN fails `<=` and Infinity fails one bound, as in Python. The constraint has its own
-- name, so it also holds alongside (and whatever the order of) migration 0008's.
--
-- Rows written before it that break it are paused (there is no job to fail) and get
-- in-range values; `jobctl schedules resume` after a `schedules add --replace` puts
-- them back to work. They are listed in the log by the scheduler if they slip in later.
UPDATE jobd.schedules SET
    paused = true,
    every_s = CASE WHEN every_s IS NULL OR (every_s >= 0.001 AND every_s <= 315360000)
                   THEN every_s ELSE 3600 END,
    tz = CASE WHEN char_length(tz) BETWEEN 1 AND 64 THEN tz ELSE 'UTC' END,
    timeout_s = CASE WHEN coalesce(timeout_s > 0 AND timeout_s <= 31536000, true)
                     THEN timeout_s END,
    max_attempts = CASE WHEN coalesce(max_attempts BETWEEN 1 AND 1000, true)
                        THEN max_attempts END,
    priority = CASE WHEN coalesce(priority BETWEEN -32768 AND 32767, true)
                    THEN priority END,
    jitter_s = CASE WHEN jitter_s >= 0 AND jitter_s <= 315360000 THEN jitter_s ELSE 0 END,
    grace_s = CASE WHEN grace_s >= 0 AND grace_s <= 315360000 THEN grace_s ELSE 60 END,
    missed_limit = least(greatest(missed_limit, 1), 100000),
    revision = revision + 1,
    updated_at = now()
WHERE NOT (coalesce(every_s >= 0.001 AND every_s <= 315360000, true)
           AND char_length(tz) BETWEEN 1 AND 64
           AND coalesce(timeout_s > 0 AND timeout_s <= 31536000, true)
           AND coalesce(max_attempts BETWEEN 1 AND 1000, true)
           AND coalesce(priority BETWEEN -32768 AND 32767, true)
           AND jitter_s >= 0 AND jitter_s <= 315360000
           AND grace_s >= 0 AND grace_s <= 315360000
           AND missed_limit BETWEEN 1 AND 100000);

ALTER TABLE jobd.schedules ADD CONSTRAINT schedules_ranges CHECK (
    (every_s IS NULL OR (every_s >= 0.001 AND every_s <= 315360000))
    AND char_length(tz) BETWEEN 1 AND 64
    AND (timeout_s IS NULL OR (timeout_s > 0 AND timeout_s <= 31536000))
    AND (max_attempts IS NULL OR max_attempts BETWEEN 1 AND 1000)
    AND (priority IS NULL OR priority BETWEEN -32768 AND 32767)
    AND jitter_s >= 0 AND jitter_s <= 315360000
    AND grace_s >= 0 AND grace_s <= 315360000
    AND missed_limit BETWEEN 1 AND 100000);
