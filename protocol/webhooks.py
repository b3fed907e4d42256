"""Completion webhooks as they cross the process boundary: an outbox row's delivery
state (`jobctl webhooks list`). URLs and secrets never cross it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

DELIVERY_STATES = ("pending", "delivered", "failed")
DeliveryState = Annotated[str, msgspec.Meta(pattern=f"^({'|'.join(DELIVERY_STATES)})$")]
WebhookName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]


class DeliveryView(msgspec.Struct, kw_only=True):
    id: int  # the outbox row; its `webhook-id` header is "msg_<id>"
    webhook: str
    event: str  # completed | failed | cancelled
    job_id: int
    state: str  # pending | delivered | failed
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None  # pending rows: when it is (or was) due
    last_attempt_at: datetime | None
    last_status: int | None  # the receiver's last HTTP status; None: no answer
    last_error: str | None
    finished_at: datetime | None
