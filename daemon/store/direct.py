"""The store on an application's own asyncio loop, for the direct producer
(daemon/producer.py): the statements of sql/ run on the caller's asyncpg connection,
with no bridge, so they can join the caller's transaction.

The enqueue itself is `jobs.enqueue_rows`, the very function PgStore runs; these are the
reads a producer needs beside it, which the daemon gets from its config instead.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from daemon.store.sql import leases as sql


async def read_settings(connection: asyncpg.Connection, names: list[str]) -> dict[str, Any]:
    """The values the daemons published (PUT_SETTINGS) under `names`; absent ones left out."""
    rows = await connection.fetch(sql.GET_SETTINGS, names)
    return {r["name"]: msgspec.json.decode(r["value"]) for r in rows}


async def live_queues(connection: asyncpg.Connection, live_s: float) -> set[str]:
    """Queues served by daemons whose heartbeat is younger than `live_s`."""
    return {r["queue"] for r in await connection.fetch(sql.LIVE_QUEUES, live_s)}
