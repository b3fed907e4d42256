"""actors/runtime/lag.py: the loop-lag instrument names the attempt that held the loop."""

from __future__ import annotations

import time

import trio

from actors.runtime import lag


async def test_a_blocking_step_is_named_after_the_attempt_that_blocked():
    seen: list[tuple[str | None, float]] = []
    instrument = lag.LoopLag(0.05, on_block=lambda kind, s: seen.append((kind, s)))
    task = trio.lowlevel.current_task()
    instrument.install()
    try:
        await trio.lowlevel.checkpoint()  # a fresh step
        # Three attempts back to back in one task step; only the middle one blocks.
        for kind, block in (("quick", 0.0), ("blocker", 0.1), ("after", 0.0)):
            began = lag.attempt_started(task, kind, 1)
            time.sleep(block)  # noqa: ASYNC251 - the point: a loop blocker
            lag.attempt_ended(task, began)
        await trio.lowlevel.checkpoint()  # the step ends: not reported a second time
        time.sleep(0.1)  # noqa: ASYNC251 - no attempt running: reported without a kind
        await trio.lowlevel.checkpoint()
    finally:
        instrument.uninstall()
    assert [kind for kind, _ in seen] == ["blocker", None]
    assert all(s >= 0.05 for _, s in seen)
    assert lag.RUNNING == {}


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
