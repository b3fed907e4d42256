"""The one road every statement takes to Postgres: the pool, the retry of a stale idle
connection, health for /readyz (a hung server is not-ready before any call times out),
and the round-trip timing. The subject modules (jobs, leases, flow, ...) build on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncpg

from actors.ports import Conflict, NullObserver, Observer, StoreUnavailable
from daemon.store.bridge import Pool, StaleConnection, call, connect, terminate
from daemon.store.migrate import apply, current_version, latest_version

# A store call waiting this long (or the database timeout, if shorter) makes the store
# unhealthy (not-ready) while it waits. Only the daemon's own short, frequent statements
# are watched: a bulk command over a big table may rightly take longer.
_HUNG_AFTER_S = 5.0
_WATCHED = frozenset({"heartbeat", "claim", "next_due", "finish", "progress", "ping"})


class StoreBase:
    def __init__(self, url: str, *, pool_min: int = 2, pool_max: int = 10, timeout_s: float = 30.0):
        self.url = url
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._timeout_s = timeout_s
        self._pool: Pool | None = None
        self._healthy = False
        # Calls in flight, by a serial number: their start times (time.monotonic()).
        self._inflight: dict[int, float] = {}
        self._serial = 0
        # time.monotonic() of the last call that found the database unavailable, and of
        # the last heartbeat that renewed this daemon's leases (the reaper's rescue hold).
        self.unavailable_at: float | None = None
        self.renewed_at: float | None = None
        self.schema_version = 0
        self.observer: Observer = NullObserver()

    # -- life -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The last call answered, and none has been waiting on the database for long:
        a hung server (accepting, answering nothing) is not-ready before any call times
        out."""
        if not self._healthy:
            return False
        if self._inflight:
            oldest = min(self._inflight.values())
            if time.monotonic() - oldest > min(_HUNG_AFTER_S, self._timeout_s):
                return False
        return True

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = value

    async def connect(self) -> None:
        """Open the pool and apply migrations; raises StoreUnavailable while the DB is down."""
        if self._pool is None:
            self._pool = Pool(self.url, max_size=self._pool_max, timeout_s=self._timeout_s)
        await self._pool.open(self._pool_min)
        await self._migrate()
        self.healthy = True

    async def _migrate(self) -> None:
        # A dedicated connection: the advisory lock is session-scoped.
        async def migrate(connection: asyncpg.Connection) -> int:
            await apply(connection)
            return await current_version(connection)

        connection = await connect(self.url, self._timeout_s)
        try:
            self.schema_version = await call(migrate, connection)
        finally:
            terminate(connection)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self) -> None:
        await self._fetchval("SELECT 1", op="ping")

    async def migrations_current(self) -> bool:
        return self.schema_version >= latest_version()

    # -- the road -----------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any, op: str = "other") -> Any:
        """Run `fn(connection, *args)` on the asyncio side; track health (/readyz) and timing."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("store is not connected")
        started = time.perf_counter()
        self._serial += 1
        serial = self._serial
        if op in _WATCHED:
            self._inflight[serial] = time.monotonic()
        try:
            try:
                async with pool.connection() as connection:
                    result = await call(fn, connection, *args)
            except StaleConnection:
                # An idle connection the server had closed (a restart, a terminated
                # backend); nothing was sent, so run it once more on a fresh one.
                async with pool.connection(fresh=True) as connection:
                    result = await call(fn, connection, *args)
        except Conflict:
            raise  # the database answered; the caller retries
        except StoreUnavailable:
            self.healthy = False
            self.unavailable_at = time.monotonic()
            raise
        finally:
            self._inflight.pop(serial, None)
        self.observer.db_round_trip(op, time.perf_counter() - started)
        self.healthy = True
        return result

    async def _fetch(self, sql: str, *args: Any, op: str = "other") -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._run(_fetch, sql, *args, op=op)
        return rows

    async def _execute(self, sql: str, *args: Any, op: str = "other") -> str:
        tag: str = await self._run(_execute, sql, *args, op=op)
        return tag

    async def _fetchval(self, sql: str, *args: Any, op: str = "other") -> Any:
        return await self._run(_fetchval, sql, *args, op=op)

    async def _count(self, sql: str, *args: Any, op: str = "other") -> int:
        """Run a statement; how many rows it changed (from its command tag)."""
        return int((await self._execute(sql, *args, op=op)).split()[-1])


async def _fetch(connection: asyncpg.Connection, sql: str, *args: Any) -> list[asyncpg.Record]:
    return await connection.fetch(sql, *args)


async def _execute(connection: asyncpg.Connection, sql: str, *args: Any) -> str:
    return await connection.execute(sql, *args)


async def _fetchval(connection: asyncpg.Connection, sql: str, *args: Any) -> Any:
    return await connection.fetchval(sql, *args)
