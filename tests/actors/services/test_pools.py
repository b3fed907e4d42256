"""The pools against a real store: a drain waits for the running attempts (told by the
dispatchers, not polled) and releases what outlives its grace; pauses, cancel routing
and the leases the heart renews (unwritten outcomes included)."""

from __future__ import annotations

import logging
import random
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio
import trio.testing

from actors.handlers import Handlers
from actors.ports import NewJob, NullObserver, Outcome
from actors.runtime.clock import TrioClock
from actors.runtime.registry import Registry
from actors.services.completer import Outcomes
from actors.services.dispatcher import QueueSettings
from actors.services.outcomes import error_class
from actors.services.pools import Pools
from actors.services.worker import AttemptRunner


class Gate(msgspec.Struct):
    tag: str = ""


class Held:
    def __init__(self) -> None:
        self.inside = 0
        self.release = trio.Event()


HELD = Held()


KINDS = Handlers()


@KINDS.job("test.hold", max_attempts=3)
async def hold(ctx, args: Gate) -> None:
    HELD.inside += 1
    try:
        await HELD.release.wait()
    finally:
        HELD.inside -= 1


@pytest.fixture(autouse=True)
def fresh_gate():
    global HELD
    HELD = Held()


@asynccontextmanager
async def running_pools(store, *, concurrency: int = 4):
    runner = AttemptRunner(
        handlers=KINDS, clock=TrioClock(), report_progress=lambda *a: None, transaction=store.transaction,
        default_timeout_s=None, progress_every_items=10, progress_every_s=10.0,
        snooze_burns_attempt=False, rng=random.Random(1))
    outcomes = Outcomes(capacity=100)
    status: list[bool] = []
    pools = Pools(
        ["default"], settings=lambda queue: QueueSettings(
            queue=queue, concurrency=concurrency, claim_batch=100, lease_s=30.0,
            poll_interval_s=0.2),
        daemon_id="d1", store=store, runner=runner, outcomes=outcomes,
        kinds=lambda: ["test.hold"], observer=NullObserver(), clock=TrioClock(),
        status_changed=lambda: status.append(pools.draining))
    async with trio.open_nursery() as nursery:
        await nursery.start(pools.supervisor(Registry(), lambda name: None).run)
        yield pools, outcomes, status
        nursery.cancel_scope.cancel()


def handed_over(outcomes: Outcomes) -> list[Outcome]:
    out = []
    while True:
        try:
            out.append(outcomes.mailbox.receive_nowait().msg)
        except trio.WouldBlock:
            return out


async def wait_for(predicate, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - state in other tasks and the database
            await trio.sleep(0.01)


async def test_a_drain_returns_once_the_running_attempts_end_within_the_grace(store, caplog):
    await store.enqueue_many([NewJob(kind="test.hold") for _ in range(3)])
    async with running_pools(store) as (pools, outcomes, _):
        await wait_for(lambda: HELD.inside == 3)
        async with trio.open_nursery() as nursery:
            drained = trio.Event()

            async def drain() -> None:
                await pools.drain(grace_s=600)
                drained.set()

            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert not drained.is_set() and pools.draining
            with caplog.at_level(logging.WARNING, logger="jobd.pools"):
                HELD.release.set()
                with trio.fail_after(15):
                    await drained.wait()
        assert pools.running() == 0
        assert not any(getattr(r, "event", None) == "daemon.released" for r in caplog.records)
        assert sorted(o.state for o in handed_over(outcomes)) == ["completed"] * 3


async def test_what_outlives_the_grace_is_released(store, caplog):
    await store.enqueue_many([NewJob(kind="test.hold") for _ in range(2)])
    async with running_pools(store) as (pools, outcomes, _):
        await wait_for(lambda: HELD.inside == 2)
        with caplog.at_level(logging.WARNING, logger="jobd.pools"):
            with trio.fail_after(15):
                await pools.drain(grace_s=0)
        assert pools.running() == 0
        [released] = [r for r in caplog.records if getattr(r, "event", None) == "daemon.released"]
        assert released.jobs == 2
        assert {error_class(o.error) for o in handed_over(outcomes)} == {"interrupted"}


async def test_jobctl_drain_stops_claiming_and_undrain_resumes(store):
    async with running_pools(store) as (pools, outcomes, status):
        result = await pools.set_draining(True)
        assert (result.daemon_id, result.draining, status) == ("d1", True, [True])
        await store.enqueue_many([NewJob(kind="test.hold")])
        pools.wake()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert HELD.inside == 0  # all tasks blocked, and still nothing claimed
        await pools.set_draining(False)
        await wait_for(lambda: HELD.inside == 1)
        assert status == [True, False]
        HELD.release.set()


async def test_a_cancel_reaches_the_pool_running_the_job(store):
    [one] = await store.enqueue_many([NewJob(kind="test.hold")])
    async with running_pools(store) as (pools, outcomes, _):
        await wait_for(lambda: HELD.inside == 1)
        await pools.cancel_here(one.id)
        await wait_for(lambda: pools.running() == 0)
        [outcome] = handed_over(outcomes)
        assert (outcome.id, outcome.state) == (one.id, "cancelled")


async def test_the_heart_renews_running_attempts_and_unwritten_outcomes(store):
    [one] = await store.enqueue_many([NewJob(kind="test.hold")])
    async with running_pools(store) as (pools, outcomes, _):
        await wait_for(lambda: HELD.inside == 1)
        outcomes.hand_over_nowait(Outcome(id=99, token=7, state="completed"))
        [(running_id, _token)] = pools.dispatchers["default"].running_attempts()
        assert running_id == one.id
        assert sorted(pools.lease_ids()) == sorted([(one.id, _token), (99, 7)])
        HELD.release.set()


async def test_pauses_are_read_per_queue(store):
    async with running_pools(store) as (pools, _, _status):
        pools.pauses = {("default", ""), ("default", "k1"), ("other", "k2")}
        assert pools.paused("default") == (True, ["k1"])
        assert pools.paused("other") == (False, ["k2"])
        assert pools.paused("none") == (False, [])
        await pools.refresh_pauses()  # from the database: nothing paused there
        assert pools.pauses == set()
