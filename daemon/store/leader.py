"""The metrics leader's session: a dedicated connection whose session-level advisory lock
makes this daemon the one that computes the queue gauges; closing it drops the lock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from actors.ports import Observer
from daemon.store.base import StoreBase
from daemon.store.bridge import call, connect, terminate
from daemon.store.sql import flow as flow_sql
from daemon.store.sql import metrics as sql


class MetricsSession:
    """Leader election and the gauge queries, on one connection that holds the lock;
    see actors.ports.GaugeSession."""

    def __init__(self, connection: asyncpg.Connection, observer: Observer):
        self._connection = connection
        self._observer = observer

    async def try_lead(self) -> bool:
        """Take the session-level leader lock if free; call once per session until True."""
        return bool(await call(self._connection.fetchval, sql.TRY_METRICS_LEADER,
                               sql.METRICS_LEADER_LOCK))

    async def ping(self) -> None:
        """One round trip on this session: the Peer's check that it still holds the lock."""
        await call(self._connection.fetchval, "SELECT 1")

    async def queue_gauges(
        self, now: datetime | None = None
    ) -> tuple[list[tuple[str, str, int]], list[tuple[str, float]]]:
        """(queue, state, count) rows and (queue, oldest claimable age in seconds) rows."""
        started = time.perf_counter()
        counts = await call(self._connection.fetch, sql.QUEUE_COUNTS)
        oldest = await call(self._connection.fetch, sql.QUEUE_OLDEST_AVAILABLE, now)
        self._observer.db_round_trip("queue_gauges", time.perf_counter() - started)
        return ([(r["queue"], r["state"], r["n"]) for r in counts],
                [(r["queue"], r["age_s"]) for r in oldest])

    async def key_gauges(self, limit: int) -> list[dict[str, Any]]:
        """The busiest flow keys (KEY_STATS), for the per-key gauges."""
        rows = await call(self._connection.fetch, flow_sql.KEY_STATS, None, limit)
        return [dict(r) for r in rows]


class MetricsSessions(StoreBase):
    @asynccontextmanager
    async def metrics_session(self) -> AsyncIterator[MetricsSession]:
        """A dedicated connection for the queue gauges; closing it drops the leader lock."""
        connection = await connect(self.url, self._timeout_s)
        try:
            yield MetricsSession(connection, self.observer)
        finally:
            terminate(connection)
