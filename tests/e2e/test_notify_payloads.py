"""LISTEN payloads are untrusted: anyone who can connect to the database can NOTIFY.

A real daemon gets garbage on every channel it listens on, then must still answer and
still react to valid notifications (the polling fallback and the heartbeat are pushed
out of the way, so only a working listener can make the job run or the cancel land).
"""

from __future__ import annotations

import json

from tests.support import wait_until

CHANNELS = ("jobd_enqueued", "jobd_cancel", "jobd_paused", "jobd_schedules", "jobd_webhooks")

GARBAGE = [
    "not-a-number", "-1", "0", "-9223372036854775808", "9223372036854775808",
    "99999999999999999999999999", "1e5", " 5", "5 ", "0x10", "٣", "1_000", "+7",
    "\x01\x02\x1f", "line\nbreak", "tab\there", "é" * 3000, "x" * 7900, "{\"queue\": 1}",
    "\U0001f4a5" * 1000, "' OR 1=1 --",
]


def _notify(sql, channel: str, payload: str) -> None:
    sql.execute("SELECT pg_notify($1, $2)", channel, payload)


def test_garbage_notifications_are_dropped_and_counted(jobd, sql):
    # No polling and no heartbeat within the test: a job runs only if the enqueue NOTIFY
    # reaches a live listener, a cancel lands only through its NOTIFY.
    daemon = jobd(jobs={"poll_interval": "1h", "lease": "3h"}, daemon={"heartbeat": "1h"})
    for channel in CHANNELS:
        for payload in GARBAGE:
            _notify(sql, channel, payload)
    # Many at once, as a flood would send them.
    sql.execute("SELECT pg_notify(c, 'junk-' || i) FROM unnest($1::text[]) c, "
                "generate_series(1, 500) i", list(CHANNELS))

    def dropped() -> list[dict]:
        return [e for e in daemon.log_events() if e.get("event") == "notify.dropped"]

    wait_until(dropped, "a notify.dropped warning", daemons=(daemon,))
    assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
    assert daemon.jobctl_json("ping")["ready"] is True
    # Rate-limited: hundreds of bad payloads, at most one warning a minute.
    assert len(dropped()) == 1, dropped()

    # Still reacts: an enqueue from another session wakes the dispatcher through NOTIFY.
    job_id = sql.fetchval("SELECT jobd.enqueue('noop', '{}'::jsonb)")
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)
               == "completed", "the NOTIFY-woken job to complete", daemons=(daemon,))

    # And a cancel of a running job arrives through jobd_cancel (the heart is asleep).
    sleeper = int(daemon.jobctl("enqueue", "sleep", "--args",
                                json.dumps({"seconds": 600, "steps": 1})).stdout)
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", sleeper)
               == "running", "the sleeper to run", daemons=(daemon,))
    # As another daemon's `cancel` would: flag the row, then NOTIFY (jobctl cancel here
    # would cancel locally without the listener).
    sql.execute("UPDATE jobd.jobs SET cancel_requested = true WHERE id = $1", sleeper)
    _notify(sql, "jobd_cancel", "-5")  # garbage right before the valid one
    _notify(sql, "jobd_cancel", str(sleeper))
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", sleeper)
               == "cancelled", "the running job to be cancelled", daemons=(daemon,))
    assert daemon.jobctl_json("ping")["ready"] is True


def test_payload_rules():
    from actors.services.notifier import valid_payload as _valid_payload

    assert _valid_payload("jobd_cancel", "9223372036854775807")
    assert _valid_payload("jobd_cancel", "1")
    for bad in ("9223372036854775808", "0", "-1", "1.0", "", "٣", " 1"):
        assert _valid_payload("jobd_cancel", bad) == (bad == ""), bad
    assert _valid_payload("jobd_enqueued", "crawl")
    assert _valid_payload("jobd_schedules", "nightly report")
    assert not _valid_payload("jobd_paused", "a\nb")
    assert not _valid_payload("jobd_enqueued", "q" * 256)
    assert not _valid_payload("jobd_other", "x")
