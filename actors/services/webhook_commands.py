"""The control actor's webhook commands: list the outbox, replay rows.

A replay is a store call that makes rows due; the courier of this daemon is woken at
once, and any other daemon declaring the webhook finds them on its next claim.
"""

from __future__ import annotations

from collections.abc import Callable

from actors.ports import Store
from protocol import commands as c
from protocol.errors import BadRequest
from protocol.webhooks import DeliveryView


async def handle(store: Store, cmd: c.WebhookList | c.WebhookReplay,
                 wake_courier: Callable[[], None]) -> c.WebhooksPage | c.WebhookReplayResult:
    if isinstance(cmd, c.WebhookList):
        rows = await store.list_deliveries(cmd.state, cmd.webhook, cmd.cursor, cmd.limit)
        more = len(rows) == cmd.limit
        return c.WebhooksPage(deliveries=[DeliveryView(**r) for r in rows],
                              next_cursor=rows[-1]["id"] if more else None)
    if not cmd.ids and not cmd.failed:
        raise BadRequest("webhook_replay needs ids or failed = true", details={"field": "ids"})
    replayed = sorted(i for i, _ in await store.replay_deliveries(cmd.ids, cmd.failed))
    if replayed:
        wake_courier()
    refused = sorted(set(cmd.ids) - set(replayed))
    return c.WebhookReplayResult(replayed=replayed, refused=refused)
