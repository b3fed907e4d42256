"""PgStore's flow-control statements (sql/flow.py) outside the claim: key state for
`jobctl stats`, priority aging, and pruning idle keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from daemon.store.base import StoreBase
from daemon.store.sql import flow as sql


class FlowStatements(StoreBase):
    async def key_stats(self, queue: str | None, limit: int = 50) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._fetch(sql.KEY_STATS, queue, limit, op="stats")]

    async def age_priorities(
        self, queue: str, aging_s: float, floor: int, limit: int, now: datetime | None = None
    ) -> int:
        return await self._count(sql.AGE_PRIORITIES, queue, aging_s, floor, now, limit,
                                 op="aging")

    async def prune_idle_keys(
        self, limit: int, idle_s: float, forget_s: float, now: datetime | None = None
    ) -> int:
        """Delete up to `limit` flow-key rows in their default state whose key has nothing
        available or running and was idle for `idle_s` (sql.flow.PRUNE_IDLE_KEYS)."""
        return await self._count(sql.PRUNE_IDLE_KEYS, limit, idle_s, now, forget_s, op="prune")
