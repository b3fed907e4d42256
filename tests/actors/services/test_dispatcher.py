"""The dispatcher's worker pool against a real store: slots bound the attempts that run
at once, quick jobs run back to back, a shrink retires workers, and every claimed job
reaches the completer exactly once."""

from __future__ import annotations

import random
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from actors.handlers import HANDLERS, job
from actors.ports import NewJob, NullObserver, Outcome
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.dispatcher import Dispatcher, QueueSettings, Resize, Running, Wake
from actors.services.worker import AttemptRunner


class Gate(msgspec.Struct):
    tag: str = ""


class Probe:
    """Counts the attempts inside the handler right now, and the most at any moment."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.release = trio.Event()
        self.started = 0
        self.events: list[tuple[str, int]] = []

    async def hold(self) -> None:
        self.started += 1
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.release.wait()
        finally:
            self.inside -= 1


PROBE = Probe()


@pytest.fixture(autouse=True)
def kinds(empty_handlers):
    global PROBE
    PROBE = Probe()

    @job("test.hold", max_attempts=1)
    async def hold(ctx, args: Gate) -> None:
        await PROBE.hold()

    @job("test.quick", max_attempts=1)
    async def quick(ctx, args: Gate) -> str:
        return args.tag

    @job("test.crash", max_attempts=1)
    async def crash(ctx, args: Gate) -> None:
        raise SystemExit(args.tag)

    @job("test.limited", max_attempts=1)
    async def limited(ctx, args: Gate) -> None:
        from actors import RateLimited

        raise RateLimited(float(args.tag) if args.tag else None)

    @job("test.lapse", max_attempts=5)
    async def lapse(ctx, args: Gate) -> str:
        PROBE.events.append(("start", ctx.job.attempt))
        try:
            await PROBE.hold()
        finally:
            PROBE.events.append(("end", ctx.job.attempt))
        return "done"
    yield


@asynccontextmanager
async def dispatcher(store, *, concurrency: int, claim_batch: int = 100,
                     kinds: tuple[str, ...] = ("test.hold", "test.quick"), observer=None):
    finished: list[Outcome] = []
    box: Mailbox = Mailbox("pool:default", capacity=100)
    runner = AttemptRunner(
        handlers=HANDLERS, clock=TrioClock(), report_progress=lambda *a: None, transaction=store.transaction,
        default_timeout_s=None, progress_every_items=10, progress_every_s=10.0,
        snooze_burns_attempt=False, rng=random.Random(1))

    async def finish(outcome: Outcome) -> None:
        finished.append(outcome)

    d = Dispatcher(
        box, QueueSettings(queue="default", concurrency=concurrency, claim_batch=claim_batch,
                           lease_s=30.0, poll_interval_s=0.2),
        daemon_id="d1", store=store, runner=runner, finish=finish,
        finish_nowait=finished.append, kinds=lambda: list(kinds),
        paused=lambda queue: (False, []), observer=observer or NullObserver(),
        clock=TrioClock())
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        yield d, box, finished
        nursery.cancel_scope.cancel()


async def wait_for(predicate, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - state in other tasks and the database
            await trio.sleep(0.01)


class ClaimsSeen:
    """The real store, recording each claim's size and the attempts running when it
    was asked: a sixth attempt could only come from a claim asking past the free slots."""

    def __init__(self, store) -> None:
        self._store = store
        self.running = lambda: 0
        self.claims: list[tuple[int, int]] = []

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def claim(self, queue, n, *args, **kwargs):
        self.claims.append((n, self.running()))
        return await self._store.claim(queue, n, *args, **kwargs)


async def test_slots_bound_the_attempts_running_at_once(store):
    await store.enqueue_many([NewJob(kind="test.hold") for _ in range(12)])
    seen = ClaimsSeen(store)
    async with dispatcher(seen, concurrency=5) as (d, box, finished):
        seen.running = lambda: d.running
        await wait_for(lambda: PROBE.inside == 5)
        assert (PROBE.most, await box.ask(Running())) == (5, 5)
        PROBE.release.set()
        await wait_for(lambda: len(finished) == 12)
    assert PROBE.most == 5
    assert all(n + running <= 5 for n, running in seen.claims), seen.claims
    assert sorted(o.state for o in finished) == ["completed"] * 12


async def test_quick_jobs_each_finish_once_with_their_result(store):
    done = await store.enqueue_many(
        [NewJob(kind="test.quick", args=f'{{"tag": "t{i}"}}') for i in range(500)])
    async with dispatcher(store, concurrency=50, claim_batch=40) as (d, box, finished):
        await wait_for(lambda: len(finished) == 500)
        await trio.sleep(0.1)
        assert len(finished) == 500
        assert d.running == 0
        # Quick jobs ran on a few workers back to back, not one task each.
        assert d._tasks.workers <= 50
    by_id = {o.id: o for o in finished}
    assert sorted(by_id) == sorted(e.id for e in done)
    assert {by_id[e.id].result for e in done} == {f'"t{i}"' for i in range(500)}


async def test_a_shrink_retires_workers_and_later_attempts_obey_it(store):
    await store.enqueue_many([NewJob(kind="test.hold") for _ in range(4)])
    async with dispatcher(store, concurrency=4) as (d, box, finished):
        await wait_for(lambda: PROBE.inside == 4)
        await box.ask(Resize(concurrency=2))
        PROBE.release.set()
        await wait_for(lambda: len(finished) == 4)
        PROBE.release = trio.Event()
        PROBE.most = 0
        await store.enqueue_many([NewJob(kind="test.hold") for _ in range(6)])
        await box.ask(Wake())
        await wait_for(lambda: PROBE.inside == 2)
        await trio.sleep(0.2)
        assert PROBE.most == 2
        PROBE.release.set()
        await wait_for(lambda: len(finished) == 10)
        assert d._tasks.workers == 2  # the two extra workers left after their attempts


async def test_a_shrink_between_claim_and_start_still_runs_the_queued_attempt(store):
    """A reload that shrinks the slots after an attempt was queued and a parked worker
    woken for it: that worker retires, and the attempt must still reach one."""
    from actors.services.worker import Attempt

    await store.enqueue_many([NewJob(kind="test.hold") for _ in range(4)])
    async with dispatcher(store, concurrency=4) as (d, box, finished):
        await wait_for(lambda: PROBE.inside == 4)
        PROBE.release.set()
        await wait_for(lambda: len(finished) == 4 and d.running == 0)
        assert d._tasks.workers == 4  # all parked now
        await store.enqueue_many([NewJob(kind="test.quick", args='{"tag": "late"}')])
        [claimed] = await store.claim("default", 1, "d1", 30.0, ["test.quick"])
        # What the claim loop and a Resize do, with no checkpoint in between.
        attempt = Attempt(claimed)
        d._attempts[attempt.key] = attempt
        d._tasks.ready.append(attempt)
        d._tasks.wake_one()
        d.settings.concurrency = 1
        await wait_for(lambda: len(finished) == 5)
        assert finished[-1].result == '"late"'
        assert d._tasks.workers == 1


# --------------------------------------------------------------------------- lost leases


async def lapse_the_lease(store) -> None:
    """What a stall past the lease leads to: the lease expires and a reaper rescues it."""
    async with store.transaction() as tx:
        await tx.execute("UPDATE jobd.jobs SET lease_until = now() - interval '1 second'"
                         " WHERE state = 'running'")
    assert len(await store.rescue_expired(100)) == 1


async def test_a_job_claimed_again_here_waits_for_its_old_attempt_to_stop(store):
    """The same daemon reclaims a job whose lease lapsed while its attempt still ran:
    the old attempt is stopped first (its outcome is never sent), the new one starts
    after it ended, and the heart renews the new attempt."""
    [done] = await store.enqueue_many([NewJob(kind="test.lapse")])
    async with dispatcher(store, concurrency=3, kinds=("test.lapse",)) as (d, box, finished):
        await wait_for(lambda: PROBE.inside == 1)
        [(job_id, first_token)] = d.running_attempts()
        await lapse_the_lease(store)
        await box.ask(Wake())  # the claim loop takes the job again: attempt 2
        await wait_for(lambda: ("start", 2) in PROBE.events)
        assert PROBE.events == [("start", 1), ("end", 1), ("start", 2)]
        assert PROBE.most == 1, "two attempts of one job ran at once"
        [(again, token)] = d.running_attempts()
        assert (again, token > first_token) == (job_id, True)
        assert await store.heartbeat("d1", 30.0, "ok", False,
                                     running=d.running_attempts()) == []
        PROBE.release.set()
        await wait_for(lambda: len(finished) == 1)
    [outcome] = finished  # nothing was sent for the stopped attempt
    assert (outcome.id, outcome.token, outcome.state) == (done.id, token, "completed")


async def test_the_heart_stops_an_attempt_whose_lease_is_gone(store):
    from actors.services.dispatcher import Drain, LeaseLost
    from actors.services.heart import Heart

    await store.enqueue_many([NewJob(kind="test.lapse")])
    async with dispatcher(store, concurrency=3, kinds=("test.lapse",)) as (d, box, finished):
        await wait_for(lambda: PROBE.inside == 1)
        await box.ask(Drain())  # claim nothing more: only the heart can notice
        await lapse_the_lease(store)
        heart = Heart(Mailbox("heart", capacity=4), store, daemon_id="d1", lease_s=30.0,
                      interval_s=10.0, status=lambda: ("ok", False),
                      running=d.running_attempts, cancel=lambda job_id: None,
                      lease_lost=lambda i, t: box.tell_nowait(LeaseLost(i, t)),
                      clock=TrioClock())
        await heart.beat()
        await wait_for(lambda: ("end", 1) in PROBE.events and d.running == 0)
        await trio.sleep(0.1)
    assert finished == []  # fenced anyway: not written, not counted as a failure
    assert PROBE.events == [("start", 1), ("end", 1)]


# --------------------------------------------------------------------------- containment


class Recorder:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.finished: list[str] = []

    def error_classified(self, queue: str, error_class: str) -> None:
        self.errors.append((queue, error_class))

    def job_finished(self, queue: str, kind: str, outcome: str, run_s: float) -> None:
        self.finished.append(outcome)

    def key_paused(self, queue: str, key: str) -> None:
        self.errors.append((queue, f"paused:{key}"))

    def __getattr__(self, name: str):
        return lambda *a, **k: None


async def test_a_crashing_handler_is_counted_and_the_pool_goes_on(store):
    await store.enqueue_many([NewJob(kind="test.crash", args='{"tag": "exit"}', max_attempts=1),
                              NewJob(kind="test.quick", args='{"tag": "after"}')])
    seen = Recorder()
    async with dispatcher(store, concurrency=1, kinds=("test.crash", "test.quick"),
                          observer=seen) as (d, box, finished):
        await wait_for(lambda: len(finished) == 2)
    assert sorted((o.state, o.result) for o in finished) == [
        ("completed", '"after"'), ("failed", None)]
    assert seen.errors == [("default", "crashed")]
    assert sorted(seen.finished) == ["completed", "failed"]


async def test_a_bug_around_one_attempt_fails_that_attempt_only(store, monkeypatch):
    """Whatever escapes the runner (here: a RecursionError from building the attempt's
    context) fails that attempt as crashed; the dispatcher and the other jobs go on."""
    [bad, good] = await store.enqueue_many([
        NewJob(kind="test.quick", args='{"tag": "bad"}'),
        NewJob(kind="test.quick", args='{"tag": "good"}')])
    async with dispatcher(store, concurrency=1) as (d, box, finished):
        real = d._runner._context

        def context(job):
            if job.id == bad.id:
                raise RecursionError("maximum recursion depth exceeded")
            return real(job)

        monkeypatch.setattr(d._runner, "_context", context)
        await wait_for(lambda: len(finished) == 2)
    by_id = {o.id: o for o in finished}
    assert by_id[good.id].state == "completed"
    assert by_id[bad.id].state == "scheduled"  # crashed: retried per max_attempts
    assert msgspec.json.decode(by_id[bad.id].error)["class"] == "crashed"


class SlowClaimReply:
    """The real store, but a claim's reply arrives only when the test lets it: the claim
    has committed in Postgres while the daemon has not seen its rows yet."""

    def __init__(self, store) -> None:
        self._store = store
        self.committed = trio.Event()
        self.deliver = trio.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def claim(self, *args, **kwargs):
        rows = await self._store.claim(*args, **kwargs)
        if rows:
            self.committed.set()
            await self.deliver.wait()
        return rows


async def test_a_claim_in_flight_keeps_the_pool_busy_for_the_drain(store):
    from actors.services.dispatcher import Drain

    await store.enqueue_many([NewJob(kind="test.quick") for _ in range(3)])
    slow = SlowClaimReply(store)
    async with dispatcher(slow, concurrency=5) as (d, box, finished):
        await slow.committed.wait()
        await box.tell(Drain())
        # No attempt exists yet, but three jobs are already ours in Postgres: a drain
        # that stopped now would leave them `running` until their leases lapse.
        assert d.running == 0 and d.busy
        slow.deliver.set()
        await wait_for(lambda: len(finished) == 3)
        await wait_for(lambda: not d.busy)
    assert sorted(o.state for o in finished) == ["completed"] * 3


async def test_every_rate_limit_on_a_key_counts_as_a_key_pause(store):
    """A rate limit that states no pause pauses the key for the queue's default: it is a
    key pause like one with a Retry-After, and the counter says so."""
    await store.enqueue_many([
        NewJob(kind="test.limited", key="ebay", args='{"tag": "5"}', max_attempts=1),
        NewJob(kind="test.limited", key="ebay", args='{"tag": ""}', max_attempts=1)])
    seen = Recorder()
    async with dispatcher(store, concurrency=2, kinds=("test.limited",),
                          observer=seen) as (d, box, finished):
        await wait_for(lambda: len(finished) == 2)
    assert [e for e in seen.errors if e[1].startswith("paused")] == [
        ("default", "paused:ebay")] * 2
