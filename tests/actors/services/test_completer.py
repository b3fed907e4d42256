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

from actors.ports import NewJob, NullObserver, Outcome, StoreUnavailable
from actors.runtime.clock import TrioClock
from actors.services.batcher import Batcher
from actors.services.completer import Completer, Outcomes


class FakeStore:
    """finish_many that records batches and reports a key's failures as told."""

    def __init__(self, failures: dict[int, tuple[str, str, int]] | None = None) -> None:
        self.batches: list[list[Outcome]] = []
        self.failures = failures or {}
        self.down = False

    async def finish_many(self, batch, key_failures=None):
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StoreUnavailable("down")
        self.batches.append(list(batch))
        for outcome in batch:
            if outcome.id in self.failures and key_failures is not None:
                key_failures(*self.failures[outcome.id])
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


async def test_what_was_handed_over_is_written_when_the_mailbox_closes(autojump_clock):
    store, outcomes = FakeStore(), Outcomes(capacity=100)
    for i in range(5):
        outcomes.hand_over_nowait(done(i))
    assert sorted(outcomes.leases()) == [(i, 1) for i in range(5)]
    outcomes.mailbox.close()
    await completer(outcomes, store).run()
    assert store.written == [0, 1, 2, 3, 4]
    assert outcomes.leases() == []  # written: no longer renewed or reported


async def test_the_stopper_writes_what_was_handed_over_before_it(autojump_clock):
    store, outcomes = FakeStore(), Outcomes(capacity=100)
    stop = Batcher.stopper(outcomes.mailbox)
    async with trio.open_nursery() as nursery:
        await nursery.start(completer(outcomes, store).run)
        for i in range(3):
            await outcomes.hand_over(done(i))
        await stop()
    assert store.written == [0, 1, 2]


async def test_a_written_retry_wakes_the_dispatchers_and_a_completion_does_not(autojump_clock):
    store, outcomes, wakes = FakeStore(), Outcomes(capacity=100), []
    outcomes.hand_over_nowait(done(1))
    outcomes.mailbox.close()
    await completer(outcomes, store, wakes=wakes).run()
    assert wakes == []

    outcomes = Outcomes(capacity=100)
    outcomes.hand_over_nowait(Outcome(id=2, token=1, state="available", delay_s=0.0))
    outcomes.hand_over_nowait(Outcome(id=3, token=1, state="scheduled", delay_s=5.0))
    outcomes.mailbox.close()
    await completer(outcomes, store, wakes=wakes).run()
    assert wakes == [1]  # once per batch


async def test_the_breaker_is_announced_when_failures_reach_the_threshold(autojump_clock, caplog):
    # Key "a" reaches 3 (the threshold), "b" is past it (already open): one event.
    store = FakeStore({1: ("q", "a", 2), 2: ("q", "a", 3), 3: ("q", "b", 4)})
    outcomes, seen = Outcomes(capacity=100), Seen()
    for i in (1, 2, 3):
        outcomes.hand_over_nowait(done(i, "failed"))
    outcomes.mailbox.close()
    with caplog.at_level(logging.WARNING, logger="jobd.completer"):
        await completer(outcomes, store, threshold=3, observer=seen).run()
    assert seen.breakers == [("q", "a")]
    events = [r for r in caplog.records if getattr(r, "event", None) == "flow.breaker_opened"]
    assert [(r.queue, r.key) for r in events] == [("q", "a")]


async def test_unwritten_outcomes_are_tracked_and_reported(autojump_clock, caplog):
    store, outcomes = FakeStore(), Outcomes(capacity=100)
    store.down = True
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
