-- Paused queues (key = '') and keys: claims skip them on every daemon, and a pause
-- survives restarts because it lives here.
CREATE TABLE jobd.pauses (
    queue     text NOT NULL,
    key       text NOT NULL DEFAULT '',
    paused_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, key)
);
