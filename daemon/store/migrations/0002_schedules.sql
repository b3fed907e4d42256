-- Schedules: definitions (from the config file or added at run time) and one row per
-- fired occurrence. The fires table is what makes firing exactly-once across daemons:
-- an occurrence's job is inserted in the same statement as its (schedule, fire_at)
-- row, and only when that row was new.

CREATE TABLE jobd.schedules (
    name          text PRIMARY KEY,
    kind          text NOT NULL,
    cron          text,
    every_s       double precision,
    tz            text NOT NULL DEFAULT 'UTC',
    args          jsonb NOT NULL DEFAULT '{}',
    queue         text,
    key           text,
    priority      integer,
    max_attempts  integer,
    timeout_s     double precision,
    tags          text[] NOT NULL DEFAULT '{}',
    jitter_s      double precision NOT NULL DEFAULT 0,
    missed        text NOT NULL DEFAULT 'latest',
    missed_limit  integer NOT NULL DEFAULT 100,
    grace_s       double precision NOT NULL DEFAULT 60,
    paused        boolean NOT NULL DEFAULT false,
    source        text NOT NULL DEFAULT 'runtime',
    -- Bumped when the definition changes; a fire computed from an older revision is refused.
    revision      integer NOT NULL DEFAULT 1,
    -- Watermark: every regular occurrence at or before it was fired or skipped (by
    -- policy). Only moves forward. A new schedule starts at its creation time.
    handled_until timestamptz NOT NULL DEFAULT now(),
    last_fire_at  timestamptz,
    last_job_id   bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_timing CHECK ((cron IS NULL) <> (every_s IS NULL)),
    CONSTRAINT schedules_missed CHECK (missed IN ('skip', 'latest', 'all')),
    CONSTRAINT schedules_source CHECK (source IN ('config', 'runtime'))
);

CREATE TABLE jobd.schedule_fires (
    schedule text NOT NULL,
    fire_at  timestamptz NOT NULL,
    job_id   bigint NOT NULL,
    manual   boolean NOT NULL DEFAULT false,
    fired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, fire_at)
);

CREATE INDEX schedule_fires_fired_at ON jobd.schedule_fires (fired_at);

-- Children enqueued by a handler (`ctx.enqueue_batch`) are created once per unique key
-- among all retained jobs, finished ones included: this index finds those.
CREATE INDEX jobs_unique_key_any ON jobd.jobs (unique_key) WHERE unique_key IS NOT NULL;
