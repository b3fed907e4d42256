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


def test_no_bridge_connection_is_touched_from_the_trio_thread() -> None:
    """A connection from `bridge.connect` belongs to the loop thread: `x.terminate()` or
    `x.close()` called on it directly (not through bridge.call / bridge.terminate) closes
    a uvloop transport from another thread, which crashed a test process with SIGSEGV."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*root.glob("tests/**/*.py"), *root.glob("daemon/**/*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.AsyncFunctionDef | ast.FunctionDef):
                continue
            owned = {t.id for node in ast.walk(fn) if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Await)
                     and isinstance(call := node.value.value, ast.Call)
                     and isinstance(call.func, ast.Attribute) and call.func.attr == "connect"
                     and isinstance(call.func.value, ast.Name) and call.func.value.id == "bridge"
                     for t in node.targets if isinstance(t, ast.Name)}
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("terminate", "close")
                        and isinstance(node.func.value, ast.Name) and node.func.value.id in owned):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, f"use bridge.terminate(x) / bridge.call(x.close): {offenders}"
