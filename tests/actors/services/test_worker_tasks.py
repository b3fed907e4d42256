"""actors/services/worker_tasks.py: how fast a batch of claimed attempts gets started,
whether each job blocks at once (a workflow's step) or finishes without yielding."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from actors.services.worker_tasks import WorkerTasks


def blocking() -> tuple[list[int], trio.Event, Callable[[int], Awaitable[None]]]:
    """Attempts that block until the event is set: (started, release, run)."""
    started: list[int] = []
    release = trio.Event()

    async def run(attempt: int) -> None:
        started.append(attempt)
        await release.wait()

    return started, release, run


async def test_a_batch_of_blocking_attempts_starts_in_a_few_passes():
    """Each worker whose job blocks leaves two spares: 200 attempts that all block at
    once are started within about log2(200) scheduling passes, not 200."""
    started, release, run = blocking()
    async with trio.open_nursery() as nursery:
        tasks = WorkerTasks(nursery, lambda: 200, run)
        tasks.ready.extend(range(200))  # type: ignore[arg-type]
        tasks.wake_one()
        passes = 0
        while len(started) < 200 and passes < 100:
            await trio.lowlevel.checkpoint()  # one scheduling pass of the others
            passes += 1
        release.set()
        nursery.cancel_scope.cancel()  # idle workers park for good
    assert sorted(started) == list(range(200))
    assert passes <= 12, passes


async def test_quick_attempts_run_back_to_back_on_few_workers():
    done: list[int] = []

    async def run(attempt) -> None:
        done.append(attempt)

    async with trio.open_nursery() as nursery:
        tasks = WorkerTasks(nursery, lambda: 200, run)
        tasks.ready.extend(range(1000))  # type: ignore[arg-type]
        tasks.wake_one()
        while len(done) < 1000:
            await trio.lowlevel.checkpoint()
        workers = tasks.workers
        nursery.cancel_scope.cancel()
    assert done == list(range(1000))
    assert workers <= 8, workers


async def test_never_more_workers_than_slots():
    started, release, run = blocking()
    async with trio.open_nursery() as nursery:
        tasks = WorkerTasks(nursery, lambda: 10, run)
        tasks.ready.extend(range(50))  # type: ignore[arg-type]
        tasks.wake_one()
        for _ in range(50):
            await trio.lowlevel.checkpoint()
        assert len(started) == 10 and tasks.workers == 10 and len(tasks.ready) == 40
        release.set()
        for _ in range(50):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert sorted(started) == list(range(50))
