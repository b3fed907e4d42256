"""The completer: outcomes handed over reach the store (also across a closing mailbox
and a stop), a value Postgres refuses fails that one attempt, a written retry wakes the
dispatchers, a key's breaker opening is announced once, and what never got written is
tracked (its leases renewed) and reported."""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from actors.flow import FlowLimits, KeyLimits
from actors.ports import NewJob, NullObserver, Outcome, StoreUnavailable
from actors.runtime.clock import TrioClock
from actors.services.batcher import Batcher
from actors.services.completer import Completer, Outcomes


class DownStore:
    """A store that is down until told otherwise: the one test here that needs 30 s of
    the completer's retries on trio's fake clock, which must not run against real I/O
    (it can jump while a query is in flight). The real outages are in tests/e2e."""

    def __init__(self) -> None:
        self.batches: list[list[Outcome]] = []
        self.down = True

    async def finish_many(self, batch, key_failures=None):
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StoreUnavailable("down")
        self.batches.append(list(batch))
        return {o.id for o in batch}

    @property
    def written(self) -> list[int]:
        return sorted(o.id for b in self.batches for o in b)


class Seen(NullObserver):
    def __init__(self) -> None:
        self.breakers: list[tuple[str, str]] = []

    def breaker_opened(self, queue: str, key: str) -> None:
        self.breakers.append((queue, key))


def completer(outcomes: Outcomes, store, *, threshold=None, wakes=None, observer=None):
    def wake() -> None:
        if wakes is not None:
            wakes.append(1)

    return Completer(outcomes, store, breaker_threshold=lambda q, k: threshold,
                     wake_dispatchers=wake, observer=observer or NullObserver(),
                     clock=TrioClock())


def done(i: int, state: str = "completed") -> Outcome:
    return Outcome(id=i, token=1, state=state, result="{}" if state == "completed" else None)


async def claimed(store, n: int) -> list:
    """`n` jobs enqueued and claimed here: their outcomes are the completer's to write."""
    await store.enqueue_many([NewJob(kind="k") for _ in range(n)])
    return sorted(await store.claim("default", n, "d1", 30.0, ["k"]), key=lambda j: j.id)


def finished(job, state: str = "completed", **fields) -> Outcome:
    result = "{}" if state == "completed" else None
    return Outcome(id=job.id, token=job.lease_token, state=state, result=result, **fields)


async def states(store, jobs) -> list[str]:
    return [(await store.get_job(j.id))["state"] for j in jobs]


async def test_what_was_handed_over_is_written_when_the_mailbox_closes(store):
    jobs, outcomes = await claimed(store, 5), Outcomes(capacity=100)
    for job in jobs:
        outcomes.hand_over_nowait(finished(job))
    assert sorted(outcomes.leases()) == [(j.id, j.lease_token) for j in jobs]
    outcomes.mailbox.close()
    with trio.fail_after(20):
        await completer(outcomes, store).run()
    assert await states(store, jobs) == ["completed"] * 5
    assert outcomes.leases() == []  # written: no longer renewed or reported


async def test_the_stopper_writes_what_was_handed_over_before_it(store):
    jobs, outcomes = await claimed(store, 3), Outcomes(capacity=100)
    stop = Batcher.stopper(outcomes.mailbox)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(completer(outcomes, store).run)
            for job in jobs:
                await outcomes.hand_over(finished(job))
            await stop()
    assert await states(store, jobs) == ["completed"] * 3


async def test_a_written_retry_wakes_the_dispatchers_and_a_completion_does_not(store):
    first, second, third = await claimed(store, 3)
    outcomes, wakes = Outcomes(capacity=100), []
    outcomes.hand_over_nowait(finished(first))
    outcomes.mailbox.close()
    with trio.fail_after(20):
        await completer(outcomes, store, wakes=wakes).run()
    assert wakes == []

    outcomes = Outcomes(capacity=100)
    outcomes.hand_over_nowait(finished(second, "available", delay_s=0.0))
    outcomes.hand_over_nowait(finished(third, "scheduled", delay_s=5.0))
    outcomes.mailbox.close()
    with trio.fail_after(20):
        await completer(outcomes, store, wakes=wakes).run()
    assert wakes == [1]  # once per batch
    assert await states(store, [first, second, third]) == ["completed", "available", "scheduled"]


async def test_the_breaker_is_announced_when_failures_reach_the_threshold(store, caplog):
    # Key "a" fails twice, then once more (reaching 3, the threshold), then a fourth time
    # (already open): one event, for "a" only.
    limits = FlowLimits(default=KeyLimits(concurrency=10), keys={})
    await store.enqueue_many([NewJob(kind="k", key="a") for _ in range(4)])
    jobs = sorted(await store.claim("default", 4, "d1", 30.0, ["k"], limits=limits),
                  key=lambda j: j.id)
    assert len(jobs) == 4
    seen = Seen()
    with caplog.at_level(logging.WARNING, logger="jobd.completer"):
        for batch in (jobs[:2], jobs[2:3], jobs[3:]):
            outcomes = Outcomes(capacity=100)
            for job in batch:
                outcomes.hand_over_nowait(finished(job, "failed", flow="fail",
                                                   error='{"class": "unknown"}'))
            outcomes.mailbox.close()
            with trio.fail_after(20):
                await completer(outcomes, store, threshold=3, observer=seen).run()
    assert seen.breakers == [("default", "a")]
    events = [r for r in caplog.records if getattr(r, "event", None) == "flow.breaker_opened"]
    assert [(r.queue, r.key) for r in events] == [("default", "a")]


async def test_unwritten_outcomes_are_tracked_and_reported(autojump_clock, caplog):
    store, outcomes = DownStore(), Outcomes(capacity=100)
    outcomes.hand_over_nowait(done(7))
    outcomes.hand_over_nowait(Outcome(id=8, token=2, state="available", delay_s=0.0,
                                      error=json.dumps({"class": "interrupted"})))
    with trio.move_on_after(30):  # the store stays down: the completer keeps retrying
        await completer(outcomes, store).run()
    assert store.written == []
    assert sorted(outcomes.leases()) == [(7, 1), (8, 2)]  # the heart renews these
    with caplog.at_level(logging.ERROR, logger="jobd.completer"):
        outcomes.report_unwritten(30.0)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "daemon.unwritten"]
    assert (record.outcomes, record.releases, record.jobs) == (1, 1, [7, 8])
    assert "lapse within 30s" in record.getMessage()
    # What the cancelled incarnation held is still in the backlog: the next one writes it.
    store.down = False
    outcomes.mailbox.close()
    await completer(outcomes, store).run()
    assert store.written == [7, 8] and outcomes.leases() == []


async def test_nothing_is_reported_when_everything_was_written(caplog):
    with caplog.at_level(logging.ERROR, logger="jobd.completer"):
        Outcomes().report_unwritten(30.0)
    assert not caplog.records


async def test_a_hand_over_that_fails_is_not_tracked():
    outcomes = Outcomes(capacity=1)
    outcomes.hand_over_nowait(done(1))
    with pytest.raises(trio.WouldBlock):
        outcomes.hand_over_nowait(done(2))
    assert outcomes.leases() == [(1, 1)]


async def test_a_batch_with_values_postgres_refuses_is_split_and_the_rest_written(store):
    await store.enqueue_many([NewJob(kind="k") for _ in range(6)])
    jobs = await store.claim("default", 10, "d1", 30.0, ["k"])
    a, b, c, d, e, f = sorted(jobs, key=lambda j: j.id)
    batch = [
        Outcome(id=a.id, token=a.lease_token, state="completed", result='{"ok": 1}'),
        # jsonb refuses \u0000: a DataError from the server.
        Outcome(id=b.id, token=b.lease_token, state="completed",
                result='{"html": "a\\u0000b"}'),
        Outcome(id=c.id, token=c.lease_token, state="completed", result='{"ok": 3}'),
        # A lone surrogate cannot even be encoded to UTF-8 on our side; a retry keeps
        # its retry.
        Outcome(id=d.id, token=d.lease_token, state="available", delay_s=0.0,
                error=json.dumps({"class": "unknown", "message": "\ud800"},
                                 ensure_ascii=False)),
        # A NUL in a text column (the error JSON is cast from text).
        Outcome(id=e.id, token=e.lease_token, state="failed",
                error='{"class": "unknown", "message": "x\x00y"}'),
        Outcome(id=f.id, token=f.lease_token, state="completed", result='{"ok": 6}'),
    ]
    outcomes = Outcomes(capacity=10)
    for outcome in batch:
        await outcomes.hand_over(outcome)
    outcomes.mailbox.close()
    with trio.fail_after(20):
        await completer(outcomes, store).run()
    assert outcomes.leases() == []  # every one settled, the refused ones too

    rows = {j.id: await store.get_job(j.id) for j in jobs}
    assert [rows[j.id]["state"] for j in (a, b, c, d, e, f)] == [
        "completed", "failed", "completed", "available", "failed", "completed"]
    for job in (b, d, e):
        [error] = json.loads(rows[job.id]["errors"])
        assert error["class"] == "invalid_value", error
        assert "refused" in error["message"]
    assert json.loads(rows[c.id]["result"]) == {"ok": 3}
