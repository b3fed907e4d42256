"""The heart: one beat renews this daemon's row and every lease it still holds in one
store call, reports the attempts whose lease is gone and the cancels whose NOTIFY was
missed; its loop beats on a timer, at once on `Beat`, and survives an unreachable store.

Beats against Postgres use real time only through margins no run can miss (a 5 s lease
renewed to an hour); the loop's timing runs on trio's MockClock against a stand-in store
(no Postgres I/O under a jumping clock).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
import trio
import trio.testing

from actors.ports import NewJob, StoreUnavailable
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.heart import Beat, Heart


class Counting:
    """Wraps a store and counts the calls the heart makes (a call is one statement)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return counted


def heart(store: Any, *, running: list[tuple[int, int]] | None = None,
          status: tuple[str, bool] = ("ready", False), lease_s: float = 3600.0,
          interval_s: float = 10.0, lost: list[tuple[int, int]] | None = None,
          cancelled: list[int] | None = None, report_lost: bool = True) -> Heart:
    return Heart(
        Mailbox("heart", capacity=4), store, daemon_id="d1", lease_s=lease_s,
        interval_s=interval_s, status=lambda: status, running=lambda: list(running or []),
        cancel=(cancelled if cancelled is not None else []).append,
        lease_lost=(lambda i, t: (lost if lost is not None else []).append((i, t)))
        if report_lost else None,
        clock=TrioClock())


async def claimed(store: Any, n: int, *, owner: str = "d1", lease_s: float = 5.0):
    """n jobs enqueued and claimed by `owner` with a short lease; (jobs, claim time)."""
    done = await store.enqueue_many([NewJob(kind="k") for _ in range(n)])
    t0 = max([(await store.get_job(d.id))["run_at"] for d in done]) + timedelta(seconds=1)
    jobs = await store.claim("default", n, owner, lease_s, ["k"], now=t0)
    assert len(jobs) == n
    return jobs, t0


async def test_a_beat_renews_the_daemon_and_every_lease_in_one_statement(store, sql) -> None:
    await store.register_daemon("d1", "r", "h", 1, "v")
    jobs, t0 = await claimed(store, 3)
    counting = Counting(store)
    beating = heart(counting, running=[(j.id, j.lease_token) for j in jobs],
                    status=("ready", True))
    await beating.beat()
    assert counting.calls.count("heartbeat") == 1
    assert counting.calls == ["heartbeat", "running_cancel_requests"]
    assert beating.beats == 1
    rows = sql.fetch("SELECT id, lease_until FROM jobd.jobs ORDER BY id")
    # Claimed with a 5 s lease; renewed for an hour from the beat.
    assert [r["id"] for r in rows] == sorted(j.id for j in jobs)
    assert all(r["lease_until"] > t0 + timedelta(seconds=3000) for r in rows), rows
    [daemon] = sql.fetch("SELECT status, draining, heartbeat_at > now() - interval '1 minute'"
                         " AS fresh FROM jobd.daemons WHERE id = 'd1'")
    assert (daemon["status"], daemon["draining"], daemon["fresh"]) == ("ready", True, True)


async def test_a_beat_renews_only_the_attempts_still_running_here(store, sql) -> None:
    await store.register_daemon("d1", "r", "h", 1, "v")
    (kept, dropped), t0 = await claimed(store, 2)
    await heart(store, running=[(kept.id, kept.lease_token)]).beat()
    leases = dict(sql.fetch("SELECT id, lease_until FROM jobd.jobs"))
    assert leases[kept.id] > t0 + timedelta(seconds=3000)
    assert leases[dropped.id] == t0 + timedelta(seconds=5)  # left to lapse and be rescued


async def test_a_lease_taken_by_another_daemon_is_reported_lost(store, sql) -> None:
    await store.register_daemon("d1", "r", "h", 1, "v")
    (job,), t0 = await claimed(store, 1, lease_s=5.0)
    # d1 stalled: its lease lapsed, the job was rescued and d2 runs it now.
    await store.rescue_expired(100, now=t0 + timedelta(seconds=10))
    [again] = await store.claim("default", 1, "d2", 30.0, ["k"], now=t0 + timedelta(seconds=11))
    assert again.id == job.id
    lost: list[tuple[int, int]] = []
    await heart(store, running=[(job.id, job.lease_token)], lost=lost).beat()
    assert lost == [(job.id, job.lease_token)]
    [row] = sql.fetch("SELECT lease_owner, lease_token, lease_until FROM jobd.jobs")
    assert tuple(row) == ("d2", again.lease_token, t0 + timedelta(seconds=11 + 30))  # untouched
    # Without a lease_lost hook the beat still renews and reports nothing.
    await heart(store, running=[(job.id, job.lease_token)], report_lost=False).beat()


async def test_a_beat_stops_a_running_job_whose_cancel_was_missed(store) -> None:
    await store.register_daemon("d1", "r", "h", 1, "v")
    (mine, other), _ = await claimed(store, 2)
    (elsewhere,), _ = await claimed(store, 1, owner="d2")
    for job in (mine, elsewhere):
        assert await store.cancel(job.id) == ("running", "cancelling")
    cancelled: list[int] = []
    running = [(mine.id, mine.lease_token), (other.id, other.lease_token)]
    await heart(store, running=running, cancelled=cancelled).beat()
    assert cancelled == [mine.id]  # not d2's job, not the one nobody cancelled
    # The request stays until the attempt ends: the next beat finds it again.
    await heart(store, running=running, cancelled=cancelled).beat()
    assert cancelled == [mine.id, mine.id]


class StandInStore:
    """Answers the heart's two calls; fails the first `failures` heartbeats."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.beats: list[float] = []
        self.beaten = trio.Event()

    async def heartbeat(self, daemon_id: str, lease_s: float, status: str, draining: bool,
                        now: Any = None, running: Any = None) -> list[tuple[int, int]]:
        self.beats.append(trio.current_time())
        self.beaten.set()
        self.beaten = trio.Event()
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("connection refused")
        return []

    async def running_cancel_requests(self, daemon_id: str) -> list[int]:
        return []


async def test_the_loop_beats_every_interval_and_outlives_an_unreachable_store(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    fake = StandInStore(failures=2)
    beating = heart(fake, interval_s=10.0)
    with caplog.at_level(logging.WARNING, logger="jobd.heart"):
        async with trio.open_nursery() as nursery:
            await nursery.start(beating.run)
            while len(fake.beats) < 4:
                await fake.beaten.wait()
            nursery.cancel_scope.cancel()
    start = fake.beats[0]
    assert [round(t - start, 6) for t in fake.beats[:4]] == [0.0, 10.0, 20.0, 30.0]
    assert beating.beats == 2  # the two failed beats are not counted
    events = [r for r in caplog.records if getattr(r, "event", None) == "heart.unavailable"]
    assert len(events) == 2 and "connection refused" in events[0].getMessage()


async def test_a_beat_message_beats_at_once(mock_clock: trio.testing.MockClock) -> None:
    # The clock does not move by itself: a second beat before the interval is the message's.
    fake = StandInStore()
    beating = heart(fake, interval_s=3600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(beating.run)
        while not fake.beats:
            await fake.beaten.wait()
        beaten = fake.beaten
        beating.mailbox.tell_nowait(Beat())
        await beaten.wait()
        nursery.cancel_scope.cancel()
    assert len(fake.beats) == 2 and fake.beats[1] == fake.beats[0]
