"""The only place asyncpg and trio meet.

asyncpg is asyncio-only; jobd runs one asyncio loop (uvloop when installed) on a
dedicated thread (`open_loop`), and every store call crosses to it and back once: the
coroutine is started there by a thread-safe callback, and its end wakes the waiting
trio task through the trio token. Each crossing still costs tens of microseconds, which
is why store methods take batches.

A connection belongs to the loop thread. Statements go through `call`; `terminate`
and the listener helpers below run there too. The only things read from the trio
side are the flags `is_closed()`, `is_in_transaction()` and the transport's
`is_closing()`, plain attribute reads that the GIL keeps whole, on a connection that
no operation is using at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import outcome
import trio

try:
    import uvloop
except ImportError:  # no Windows build: asyncio's own loop, at ~1.5x the CPU per call
    uvloop = None  # type: ignore[assignment]

from actors.ports import Conflict, StoreUnavailable, ValueRejected

T = TypeVar("T")

log = logging.getLogger("jobd.store")


class _Loop:
    """The running loop thread and the trio run it answers to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken):
        self.loop = loop
        self.token = token


_current: _Loop | None = None


def _new_loop() -> asyncio.AbstractEventLoop:
    if uvloop is None:
        # Not new_event_loop(): an application's event loop policy (the direct
        # producer brings the store into its process) is none of this loop's business.
        return asyncio.SelectorEventLoop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # What is still running (a connect cut short, asyncpg's background cancels):
        # cancelled and waited for, as asyncio.run() does, so nothing is left half done.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=5))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@asynccontextmanager
async def open_loop(on_error: Callable[[], None] | None = None) -> AsyncIterator[Any]:
    """The asyncio loop asyncpg runs on, on its own thread while the block runs, with an
    exception handler that logs and counts.

    asyncio reports things nobody is waiting for: the "Future exception was never
    retrieved" of a connect cancelled by its timeout while the server was going away.
    That must not stop the daemon; `on_error` (a metric) runs on the trio side.
    """
    global _current
    if _current is not None:
        raise RuntimeError("a store loop is already open")
    token = trio.lowlevel.current_trio_token()
    loop = _new_loop()

    def handle(_loop: Any, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.warning("asyncio: %s%s", context.get("message") or "error",
                    f": {exc!r}" if exc is not None else "",
                    extra={"event": "store.loop_error"})
        if on_error is not None:
            try:
                token.run_sync_soon(_count, on_error)
            except trio.RunFinishedError:
                pass

    loop.set_exception_handler(handle)
    thread = threading.Thread(target=_run_loop, args=(loop,), name="jobd-asyncpg", daemon=True)
    thread.start()
    _current = _Loop(loop, token)
    try:
        yield loop
    finally:
        _current = None
        loop.call_soon_threadsafe(loop.stop)
        # Shielded: the thread must be gone before the trio run (or the next loop) is.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)


def _count(on_error: Callable[[], None]) -> None:
    try:
        on_error()
    except Exception:  # noqa: BLE001 - a metric must not break the daemon
        pass


def _running() -> _Loop:
    current = _current
    if current is None:
        raise RuntimeError("no store loop: call inside bridge.open_loop()")
    return current


# Errors that mean "the database is not there right now", as opposed to a bad query.
# InternalClientError is asyncpg's protocol state machine refusing a connection that is
# half gone (it read the server's FATAL but not yet the EOF): that connection is dead.
_UNAVAILABLE = (
    OSError,  # ConnectionError ("unexpected connection_lost() call") among them
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, crashed
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # The server is there but cannot do the work now: disk full, out of memory, too many
    # connections (class 53), I/O errors (class 58), a standby after a failover.
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


class StaleConnection(StoreUnavailable):
    """An idle connection the server had already closed: the statement was never sent,
    so it may be run again at once on a fresh connection."""


class _Crossing:
    __slots__ = ("task", "raise_cancel")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.raise_cancel: Callable[[], Any] | None = None


_CANCELLED = object()


async def _cross(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    """`fn(*args)` as a task on the loop thread; its outcome, back in this trio task.

    Cancelled from trio, it cancels the asyncio task and waits for it to end: a
    connection must never serve two operations at once, so the caller does not get
    it back while the statement may still be running.
    """
    current = _running()
    loop, token = current.loop, current.token
    waiter = trio.lowlevel.current_task()
    crossing = _Crossing()

    def wake(result: outcome.Outcome[Any]) -> None:
        try:
            token.run_sync_soon(trio.lowlevel.reschedule, waiter, result)
        except trio.RunFinishedError:
            pass

    def done(task: asyncio.Task[Any]) -> None:  # on the loop thread
        if task.cancelled():
            wake(outcome.Value(_CANCELLED))
        else:
            exc = task.exception()
            wake(outcome.Value(task.result()) if exc is None else outcome.Error(exc))

    def start() -> None:  # on the loop thread
        try:
            task: asyncio.Task[Any] = loop.create_task(fn(*args))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - fn itself failed: the caller's error
            wake(outcome.Error(exc))
            return
        crossing.task = task
        task.add_done_callback(done)

    def cancel() -> None:  # on the loop thread, always after start()
        if crossing.task is not None:
            crossing.task.cancel()

    def abort(raise_cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
        crossing.raise_cancel = raise_cancel
        loop.call_soon_threadsafe(cancel)
        return trio.lowlevel.Abort.FAILED  # rescheduled by done(), once the task has ended

    loop.call_soon_threadsafe(start)
    result = await trio.lowlevel.wait_task_rescheduled(abort)
    if result is _CANCELLED:
        if crossing.raise_cancel is not None:
            crossing.raise_cancel()  # trio.Cancelled (or KeyboardInterrupt)
        # Nobody here asked: the loop is stopping under it.
        raise StoreUnavailable("store loop stopped")
    return result  # type: ignore[no-any-return]


def in_trio(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn` as a callback for asyncpg (a listener, a termination listener): asyncpg
    calls it on the loop thread, it runs on the trio side, in order."""
    token = _running().token

    def callback(*args: Any) -> None:
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # the daemon is gone; a late notification has nobody to tell

    return callback


async def add_termination_listener(connection: asyncpg.Connection,
                                   fn: Callable[[asyncpg.Connection], None]) -> None:
    """`fn(connection)` on the trio side once the connection is closed."""
    await call(_add_termination_listener, connection, in_trio(fn))


async def _add_termination_listener(connection: asyncpg.Connection,
                                    callback: Callable[[asyncpg.Connection], None]) -> None:
    connection.add_termination_listener(callback)


def terminate(connection: asyncpg.Connection) -> None:
    """Close a connection at once, without a goodbye to the server. Returns before it is
    done: the loop thread does it, in order after whatever was submitted before."""
    current = _current
    if current is not None:
        try:
            current.loop.call_soon_threadsafe(_terminate, connection)
            return
        except RuntimeError:  # the loop is closed: nothing else can touch the connection
            pass
    _terminate(connection)


def _terminate(connection: asyncpg.Connection) -> None:
    if not connection.is_closed():
        try:
            connection.terminate()
        except Exception:  # noqa: BLE001 - a transport of a closed loop; it is gone anyway
            pass


async def call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an asyncio coroutine function from trio, translating outages."""
    try:
        return await _cross(fn, args)
    except Exception as exc:
        translated = translate(exc)
        if translated is None:
            raise
        raise translated from exc


def translate(exc: BaseException) -> Exception | None:
    """What an asyncpg/asyncio error means to the store (StaleConnection, StoreUnavailable,
    Conflict, ValueRejected), or None for an error that is a bug to raise as it is.

    Shared by `call` and the direct producer (daemon/producer.py), which runs on the
    application's own asyncio loop, so both surfaces read one failure the same way."""
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # "cannot switch to state N; another operation is in progress": raised before
        # anything is written to the socket.
        if "cannot switch to state" in str(exc):
            return StaleConnection(f"database connection lost: {exc}")
        return StoreUnavailable(f"database unavailable: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"database unavailable: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, asyncpg.exceptions.DeadlockDetectedError
                  | asyncpg.exceptions.SerializationError):
        return Conflict(f"retry: {exc}")
    if isinstance(exc, asyncpg.DataError | asyncpg.exceptions.CheckViolationError
                  | asyncpg.exceptions.ProgramLimitExceededError):
        # The client's mistake, not a server error: every surface answers bad_request.
        # (A CHECK of migration 0008, or an index entry over the btree's row limit.)
        return ValueRejected(f"bad value: {exc}")
    return None


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE)


class Pool:
    """asyncpg connections handed out on the trio side.

    asyncpg's own Pool acquires and releases through several asyncio tasks, futures
    and shields, each its own crossing from trio (under trio-asyncio a pooled `SELECT
    1` cost 1.3 ms of CPU against 0.5 ms on a held connection). Here waiting for a free
    connection is a trio semaphore, and only the statement itself crosses to asyncio. A connection that saw an outage, a cancellation or a
    dead socket is closed instead of being reused; the next user opens a fresh one.
    """

    def __init__(self, url: str, *, max_size: int, timeout_s: float):
        self._url = url
        self._timeout_s = timeout_s
        self._settings = {"application_name": "jobd"}
        self._slots = trio.Semaphore(max_size)
        self._idle: list[asyncpg.Connection] = []
        self._closed = False

    async def open(self, count: int) -> None:
        """Open `count` connections now (raises StoreUnavailable if the database is down)."""
        while len(self._idle) < count:
            self._idle.append(await call(_connect, self._url, self._timeout_s, self._settings))

    @asynccontextmanager
    async def connection(self, fresh: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one use; `fresh` skips the idle ones (after a StaleConnection,
        the others idle since the same outage are likely stale too)."""
        if self._closed:
            raise StoreUnavailable("store is closed")
        async with self._slots:
            if fresh:
                self.discard_idle()
            idle = self._idle.pop() if self._idle else None
            while idle is not None and (idle.is_closed() or _closing(idle)):
                terminate(idle)
                idle = self._idle.pop() if self._idle else None
            conn: asyncpg.Connection = (
                idle if idle is not None
                else await call(_connect, self._url, self._timeout_s, self._settings))
            reusable = False
            try:
                yield conn
                reusable = True
            except (Conflict, ValueRejected, asyncpg.PostgresError):
                reusable = True  # the server answered; the connection is fine
                raise
            except StoreUnavailable:
                # A restart or a mass termination takes every connection opened before
                # it: do not hand the others out one failure at a time.
                self.discard_idle()
                raise
            finally:
                if reusable and not self._closed and not conn.is_closed() \
                        and not conn.is_in_transaction():
                    self._idle.append(conn)
                else:
                    terminate(conn)

    def discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            terminate(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.move_on_after(2):  # a polite goodbye; terminate() below is the bound
            for conn in idle:
                try:
                    await call(conn.close)
                except StoreUnavailable:
                    pass
        for conn in idle:
            terminate(conn)


def _closing(conn: asyncpg.Connection) -> bool:
    transport = getattr(conn, "_transport", None)
    return transport is not None and transport.is_closing()


async def connect(url: str, timeout_s: float) -> asyncpg.Connection:
    return await call(_connect, url, timeout_s, {"application_name": "jobd"})


async def _connect(url: str, timeout_s: float, settings: dict[str, str]) -> asyncpg.Connection:
    return await asyncpg.connect(
        url,
        timeout=timeout_s,
        command_timeout=timeout_s,
        server_settings=settings,
    )
