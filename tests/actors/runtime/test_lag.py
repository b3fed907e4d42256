"""actors/runtime/lag.py: the loop-lag instrument names the attempt that held the loop."""

from __future__ import annotations

import time

import trio

from actors.runtime import lag


async def test_a_blocking_attempt_is_named_while_it_still_holds_the_loop():
    seen: list[tuple[str | None, float]] = []
    watchdog = lag.Watchdog(0.05, on_block=lambda kind, s: seen.append((kind, s)))
    task = trio.lowlevel.current_task()
    watchdog.start()
    try:
        await trio.sleep(0.02)
        # Three attempts back to back in one task step; only the middle one blocks.
        for kind, block in (("quick", 0.0), ("blocker", 0.2), ("after", 0.0)):
            lag.attempt_started(task, kind, 1)
            time.sleep(block)  # noqa: ASYNC251 - the point: a loop blocker
            lag.attempt_ended(task)
        await trio.sleep(0.1)  # the on_block callback runs on the loop
        time.sleep(0.2)  # noqa: ASYNC251 - no attempt running: reported without a kind
        await trio.sleep(0.1)
    finally:
        watchdog.stop()
    assert [kind for kind, _ in seen] == ["blocker", None]  # once per stall
    assert all(s >= 0.05 for _, s in seen)
    assert lag.RUNNING == {}


async def test_a_loop_that_never_blocks_is_never_reported():
    seen: list[tuple[str | None, float]] = []
    watchdog = lag.Watchdog(0.05, on_block=lambda kind, s: seen.append((kind, s)))
    watchdog.start()
    try:
        for _ in range(30):
            await trio.sleep(0.01)
    finally:
        watchdog.stop()
    assert seen == []


def test_the_holder_is_the_attempt_whose_coroutine_is_on_the_stack():
    """_holder walks the loop thread's stack: an attempt of some other task is not it."""
    import sys

    class Task:
        def __init__(self, frame):
            self.coro = type("Coro", (), {"cr_frame": frame})()

    here = sys._getframe()
    other = Task(None)
    lag.RUNNING[other] = ("elsewhere", 2)  # type: ignore[index]
    mine = Task(here)
    lag.RUNNING[mine] = ("mine", 3)  # type: ignore[index]
    try:
        assert lag._holder(sys._getframe()) == ("mine", 3)
        del lag.RUNNING[mine]  # type: ignore[arg-type]
        assert lag._holder(sys._getframe()) is None
    finally:
        lag.RUNNING.clear()


async def test_the_probe_reports_how_late_the_loop_woke_it():
    from actors.runtime.clock import TrioClock

    lags: list[float] = []

    async def block_once() -> None:
        await trio.sleep(0.01)
        time.sleep(0.2)  # noqa: ASYNC251

    with trio.move_on_after(0.6):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lag.probe, TrioClock(), 0.05, lags.append)
            nursery.start_soon(block_once)
    assert max(lags) >= 0.1
