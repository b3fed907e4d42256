"""The store on an application's own asyncio loop, for the direct producer
(daemon/producer.py): the statements of sql/ run on the caller's asyncpg connection,
with no bridge, so they can join the caller's transaction.

The enqueue itself is `jobs.enqueue_rows`, the very function PgStore runs; here are the
reads a producer needs beside it (the daemon has them from its config), and the small
pool a producer given a URL keeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec

from daemon.store.sql import jobs as jobs_sql
from daemon.store.sql import leases as sql


async def read_settings(connection: asyncpg.Connection, names: list[str]) -> dict[str, Any]:
    """The values the daemons published (PUT_SETTINGS) under `names`; absent ones left out."""
    rows = await connection.fetch(sql.GET_SETTINGS, names)
    return {r["name"]: msgspec.json.decode(r["value"]) for r in rows}


async def tool_kinds(connection: asyncpg.Connection) -> frozenset[str]:
    """The kinds with flow-control tools (jobd.kind_tools, migration 0020)."""
    return frozenset(r["kind"] for r in await connection.fetch(jobs_sql.TOOL_KINDS))


async def live_queues(connection: asyncpg.Connection, live_s: float) -> set[str]:
    """Queues served by daemons whose heartbeat is younger than `live_s`."""
    return {r["queue"] for r in await connection.fetch(sql.LIVE_QUEUES, live_s)}


class Pool:
    """Connections for one use each, on the asyncio side.

    asyncpg's own Pool (its holder, proxy and reset machinery) cost the producer 828-971
    µs of CPU per sequential enqueue against 657-800 with this one
    (bench/direct_producer_bench.py), so this is the daemon's (bridge.Pool) again: idle
    connections in a list, a semaphore for the size, and a connection that saw anything
    but an answer from the server is closed instead of reused.
    """

    def __init__(self, url: str, *, size: int, timeout_s: float, application_name: str):
        self._url = url
        self._timeout_s = timeout_s
        self._settings = {"application_name": application_name}
        self._slots = asyncio.Semaphore(size)
        self._idle: list[asyncpg.Connection] = []
        self._closed = False

    async def open(self) -> None:
        """One connection now, so an unreachable server is known at once."""
        if not self._idle:
            self._idle.append(await self._connect())

    @asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            while conn is not None and conn.is_closed():
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = await self._connect()
            reusable = False
            try:
                yield conn
                reusable = True
            except asyncpg.PostgresError:
                reusable = True  # the server answered: the connection is fine
                raise
            finally:
                if reusable and not self._closed and not conn.is_closed() \
                        and not conn.is_in_transaction():
                    self._idle.append(conn)
                else:
                    conn.terminate()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.terminate()

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._url, timeout=self._timeout_s,
                                     command_timeout=self._timeout_s,
                                     server_settings=self._settings)
