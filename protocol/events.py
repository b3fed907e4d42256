"""Events (README: "Events and flow control"): what a sender sends, what it gets back,
and what `jobctl events list` shows.

An event name is 1 to 200 characters of letters, digits and `_ . : / @ -`
(`marketplace/capture`, `order.cancelled`); its data is a JSON object of at most
`limits.max_args_bytes`. An `idempotency_key` makes a send count once per
`events.dedup_window` (24 h): a repeat answers the first event's id with
`created: false` and starts nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

EVENT_NAME_PATTERN = r"^[A-Za-z0-9_.:/@-]{1,200}$"
EventName = Annotated[str, msgspec.Meta(pattern=EVENT_NAME_PATTERN)]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]
MAX_EVENTS_BATCH = 10_000


class EventSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: EventName
    data: dict[str, Any] = {}
    idempotency_key: IdempotencyKey | None = None


class EventView(msgspec.Struct, kw_only=True):
    id: int
    name: str
    idempotency_key: str | None
    received_at: datetime
    jobs: list[int]  # the jobs it started
    data: Any = None  # left out (None, and named in `truncated`) past limits.list_field_bytes
    truncated: list[str] = []
