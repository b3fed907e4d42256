"""PgStore's daemon and lease statements (sql/leases.py): a daemon's registration and
heartbeat, and the reaper's rescue of leases nobody renews."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import msgspec

from actors.ports import Swept
from daemon.store.base import StoreBase
from daemon.store.sql import leases as sql


class LeaseStatements(StoreBase):
    async def register_daemon(
        self, daemon_id: str, region: str, host: str, pid: int, version: str
    ) -> None:
        await self._execute(sql.REGISTER_DAEMON, daemon_id, region, host, pid, version)

    async def heartbeat(
        self,
        daemon_id: str,
        lease_s: float,
        status: str,
        draining: bool,
        now: datetime | None = None,
        running: list[tuple[int, int]] | None = None,
    ) -> list[tuple[int, int]]:
        """Renew this daemon's leases; `running` (job id, lease token) limits it to the
        attempts still alive here (None renews every job the daemon owns). Returns the
        attempts of `running` whose lease could not be renewed: they lost it."""
        pairs = sorted(running) if running is not None else None
        rows = await self._fetch(
            sql.HEARTBEAT, daemon_id, lease_s, status, draining, now,
            [p[0] for p in pairs] if pairs is not None else None,
            [p[1] for p in pairs] if pairs is not None else None, op="heartbeat",
        )
        self.renewed_at = time.monotonic()
        return [(r["id"], r["token"]) for r in rows]

    async def set_daemon_queues(self, daemon_id: str, queues: list[str]) -> None:
        await self._execute(sql.SET_DAEMON_QUEUES, daemon_id, sorted(queues))

    async def live_queues(self, live_s: float) -> list[str]:
        """Queues served by daemons whose heartbeat is younger than `live_s`."""
        return [r["queue"] for r in await self._fetch(sql.LIVE_QUEUES, live_s)]

    async def put_settings(self, settings: dict[str, Any]) -> None:
        """Limits for jobd.enqueue (SQL), e.g. {"max_args_bytes": 1048576}."""
        await self._execute(sql.PUT_SETTINGS, msgspec.json.encode(settings).decode())

    async def deregister_daemon(self, daemon_id: str) -> None:
        await self._execute(sql.DEREGISTER_DAEMON, daemon_id)

    async def list_daemons(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._fetch(sql.LIST_DAEMONS)]

    async def forget_dead_daemons(self, after_s: float, now: datetime | None = None) -> int:
        return await self._count(sql.FORGET_DEAD_DAEMONS, after_s, now)

    async def rescue_expired(self, limit: int, now: datetime | None = None) -> list[Swept]:
        rows = await self._fetch(sql.RESCUE_EXPIRED, limit, now, op="rescue")
        return [Swept(**dict(r)) for r in rows]

    async def expire_overdue(
        self, limit: int, grace_s: float, now: datetime | None = None
    ) -> list[Swept]:
        rows = await self._fetch(sql.EXPIRE_OVERDUE, limit, grace_s, now, op="expire")
        return [Swept(**dict(r)) for r in rows]
