-- Retention for workflow events (jobs.retention.events_max_age; the reaper's
-- PRUNE_EVENTS). The prune walks events from the oldest by time and stops at its batch
-- size, and for each candidate asks whether a live waiter may still need it.
CREATE INDEX events_sent_at ON jobd.events (sent_at);

-- Unfinished jobs waiting (or woken and about to re-run) on an event, by event name. No
-- job update is HOT, so each row version gets an entry here only while the predicate
-- holds: event waiters, not the rest of the table.
CREATE INDEX jobs_event_waiters ON jobd.jobs ((waiting_on ->> 'name'))
    WHERE waiting_on ->> 'type' = 'event'
      AND state IN ('scheduled', 'available', 'running', 'waiting');
