"""bridge: the asyncio loop thread asyncpg runs on, and the crossing from trio to it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import trio

from actors.ports import StoreUnavailable
from daemon.store import bridge


async def _slow_to_stop(log: list[str]) -> None:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)  # asyncpg's own cleanup also takes a moment
        log.append("stopped")
        raise


async def test_a_cancelled_call_waits_for_the_asyncio_task_to_end():
    # A connection must never serve two operations: the trio side gets it back only
    # once the statement's task has ended.
    log: list[str] = []
    async with bridge.open_loop():
        with trio.move_on_after(0.05) as scope:
            await bridge.call(_slow_to_stop, log)
        assert scope.cancelled_caught
        assert log == ["stopped"]


async def test_a_cancelled_statement_leaves_a_usable_connection(fresh_database):
    async with bridge.open_loop():
        connection = await bridge.connect(fresh_database, 10)
        try:
            started = time.monotonic()
            with trio.move_on_after(0.2):
                await bridge.call(connection.fetchval, "SELECT pg_sleep(30)")
            assert time.monotonic() - started < 10
            assert await bridge.call(connection.fetchval, "SELECT 7") == 7
        finally:
            bridge.terminate(connection)


async def _thread() -> int:
    return threading.get_ident()


async def test_calls_run_on_the_loop_thread_and_callbacks_come_back_to_trio():
    here = threading.get_ident()
    async with bridge.open_loop():
        there = await bridge.call(_thread)
        assert there != here
        seen: list[int] = []
        done = trio.Event()

        def back() -> None:
            seen.append(threading.get_ident())
            done.set()

        async def fire(callback) -> None:
            callback()

        await bridge.call(fire, bridge.in_trio(back))
        await done.wait()
        assert seen == [here]


async def test_errors_cross_translated():
    async def refuse() -> None:
        raise ConnectionResetError("gone")

    async with bridge.open_loop():
        with pytest.raises(StoreUnavailable):
            await bridge.call(refuse)
        with pytest.raises(ZeroDivisionError):
            await bridge.call(lambda: 1 / 0)  # fn itself fails, before any task


async def test_no_call_outside_the_loop():
    with pytest.raises(RuntimeError):
        await bridge.call(_thread)
