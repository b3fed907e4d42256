"""The only place asyncpg and trio-asyncio meet.

asyncpg is asyncio-only; jobd runs one asyncio loop inside trio (`open_loop`) and
crosses it once per store call. Each crossing costs tens of microseconds, which is
why store methods take batches.

trio-asyncio is imported where it is first used, not with this module: importing it
makes every later `asyncio.new_event_loop()` of the process a trio-asyncio loop, and
the direct producer (daemon/producer.py) brings the store's statements into an
application's own asyncio process, whose loop must stay its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import trio

from actors.ports import Conflict, StoreUnavailable, ValueRejected

T = TypeVar("T")

log = logging.getLogger("jobd.store")


@asynccontextmanager
async def open_loop(on_error: Callable[[], None] | None = None) -> AsyncIterator[Any]:
    """The asyncio loop asyncpg runs on, with an exception handler that logs and counts.

    trio-asyncio's default handler re-raises whatever asyncio reports into the loop's
    nursery, and asyncio reports things nobody is waiting for: the "Future exception
    was never retrieved" of a connect cancelled by its timeout while the server was
    going away. That must not stop the daemon.
    """
    import trio_asyncio

    async with trio_asyncio.open_loop() as loop:
        def handle(_loop: Any, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            log.warning("asyncio: %s%s", context.get("message") or "error",
                        f": {exc!r}" if exc is not None else "",
                        extra={"event": "store.loop_error"})
            if on_error is not None:
                try:
                    on_error()
                except Exception:  # noqa: BLE001 - a metric must not break the loop
                    pass

        loop.set_exception_handler(handle)
        yield loop


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


async def call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an asyncio coroutine function from trio, translating outages."""
    import trio_asyncio  # already loaded by open_loop: a lookup in sys.modules

    try:
        return await trio_asyncio.aio_as_trio(fn)(*args)
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
    and shields; across trio-asyncio every one of those is a pass of both event loops,
    and a pooled `SELECT 1` cost 1.3 ms of CPU against 0.5 ms on a held connection.
    Here waiting for a free connection is a trio semaphore, and only the statement
    itself crosses to asyncio. A connection that saw an outage, a cancellation or a
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
                idle.terminate()
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
                    conn.terminate()

    def discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.terminate()

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
            conn.terminate()


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
