"""PgStore's webhook statements (sql/webhooks.py): a daemon's subscriptions, and the
outbox rows the finish trigger writes, claimed, recorded, listed, replayed, pruned."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from actors.ports import Delivery, DeliveryOutcome, StoreUnavailable
from daemon.store.base import StoreBase
from daemon.store.sql import webhooks as sql


class WebhookStatements(StoreBase):
    async def sync_webhooks(self, daemon_id: str, declared: list[dict[str, Any]]) -> None:
        """Write this daemon's [[webhooks]] ({name, events, kinds, queues} each)."""
        try:
            await self._execute(sql.SYNC_WEBHOOKS, daemon_id,
                                msgspec.json.encode(declared).decode(), op="webhooks")
        except asyncpg.exceptions.LockNotAvailableError as exc:
            # Turning the finish trigger on waits for jobd.jobs; busy now, so later.
            raise StoreUnavailable(f"webhooks not synced yet: {exc}") from None

    async def claim_deliveries(self, daemon_id: str, wanted: dict[str, int], lease_s: float,
                               now: datetime | None = None) -> list[Delivery]:
        names = sorted(wanted)
        rows = await self._fetch(sql.CLAIM_DELIVERIES, daemon_id, names,
                                 [wanted[n] for n in names], lease_s, now, op="webhook_claim")
        return [Delivery(**dict(r)) for r in rows]

    async def next_delivery_due(self, webhooks: list[str],
                                now: datetime | None = None) -> float | None:
        """Seconds until the next row is due (0 if one is already), None if none pending."""
        value: float | None = await self._fetchval(sql.NEXT_DELIVERY_DUE, webhooks, now,
                                                   op="webhook_claim")
        return None if value is None else max(value, 0.0)

    async def record_deliveries(self, outcomes: list[DeliveryOutcome],
                                now: datetime | None = None) -> None:
        await self._execute(
            sql.RECORD_DELIVERIES, [o.id for o in outcomes], [o.attempts for o in outcomes],
            [o.state for o in outcomes], [o.delay_s for o in outcomes],
            [o.status for o in outcomes], [o.error for o in outcomes], now,
            op="webhook_record")

    async def list_deliveries(self, state: str | None, webhook: str | None,
                              cursor: int | None, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(sql.LIST_DELIVERIES, state, webhook, cursor, limit, op="list")
        return [dict(r) for r in rows]

    async def replay_deliveries(self, ids: list[int], failed: bool,
                                now: datetime | None = None) -> list[tuple[int, str]]:
        rows = await self._fetch(sql.REPLAY_DELIVERIES, ids, failed, now, op="bulk")
        return [(r["id"], r["webhook"]) for r in rows]

    async def prune_deliveries(self, ages: dict[str, tuple[float, float]], limit: int,
                               others_max_age_s: float, now: datetime | None = None) -> int:
        """`ages`: webhook -> (delivered max age, failed max age), in seconds."""
        names = sorted(ages)
        return await self._count(sql.PRUNE_DELIVERIES, names, [ages[n][0] for n in names],
                                 [ages[n][1] for n in names], limit, others_max_age_s, now,
                                 op="webhook_prune")

    async def delivery_backlog(self, webhooks: list[str], now: datetime | None = None
                               ) -> dict[str, tuple[int, float]]:
        """webhook -> (pending rows, the oldest one's age in seconds)."""
        rows = await self._fetch(sql.DELIVERY_BACKLOG, webhooks, now, op="webhook_backlog")
        return {r["webhook"]: (r["pending"], r["oldest_s"]) for r in rows}
