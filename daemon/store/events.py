"""PgStore's event statements (sql/events.py): send, sync subscriptions, list, prune."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from actors.ports import EventSent, EventToSend, Subscription
from daemon.store.base import StoreBase
from daemon.store.sql import events as eq


class EventStatements(StoreBase):
    async def send_events(self, events: list[EventToSend]) -> list[EventSent]:
        """One statement, one transaction: a value Postgres refuses fails all of it."""
        rows = await self._fetch(eq.SEND_EVENTS, [e.name for e in events],
                                 [e.data for e in events], [e.key for e in events], op="event")
        return [EventSent(id=r["event_id"], created=r["created"], started=list(r["started"]),
                          started_kinds=list(r["started_kinds"]),
                          cancelled=list(r["cancelled"]), woken=list(r["woken"]))
                for r in rows]

    async def sync_subscriptions(self, daemon_id: str, subscriptions: list[Subscription],
                                 kinds: list[str], live_s: float) -> tuple[int, int]:
        """(rows written, rows removed)."""
        row = (await self._fetch(eq.SYNC_SUBSCRIPTIONS, daemon_id,
                                 msgspec.json.encode(subscriptions).decode(), kinds, live_s,
                                 op="subscriptions"))[0]
        return row["kept"], row["removed"]

    async def list_events(self, name: str | None, cursor: int | None, limit: int,
                          field_bytes: int) -> list[dict[str, Any]]:
        rows = await self._fetch(eq.LIST_EVENTS, name, cursor, limit, field_bytes, op="list")
        return [dict(r) for r in rows]

    async def list_subscriptions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._fetch(eq.LIST_SUBSCRIPTIONS, op="list")]

    async def prune_event_keys(self, limit: int, now: datetime | None = None) -> int:
        return await self._count(eq.PRUNE_EVENT_KEYS, limit, now, op="prune")
