"""The control actor's event commands: send one, send many, list.

A send is one store call (jobd.send_event does the rest in Postgres: the event row, its
idempotency key, the jobs it starts and cancels, the waiters it wakes), so no actor
message is needed: the NOTIFYs of that transaction wake the dispatchers and stop the
running jobs it cancelled. Data is checked here as args are (size, NUL) so every surface
answers the same typed error before Postgres is asked.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

import msgspec

from actors.ports import EventSent, EventToSend, Observer, Store
from actors.services.group_commit import MAX_ROWS, GroupCommit
from actors.validate import has_nul
from protocol import commands as c
from protocol.errors import BadRequest, ErrorCode, JobdError
from protocol.events import MAX_EVENTS_BATCH, EventView

EventCommand = c.SendEvent | c.SendEvents | c.ListEvents


class EventSender(GroupCommit[EventToSend, EventSent]):
    """Single sends from many clients at once share statements (group commit, as single
    enqueues do): each event is still its own answer, and a value Postgres refuses is
    found by writing that statement again one event at a time."""

    def __init__(self, store: Store, *, max_data_bytes: int):
        super().__init__(store.send_events, what="send_event", max_rows=MAX_ROWS,
                         size=lambda e: len(e.data), max_bytes=4 * max_data_bytes)


async def handle(store: Store, observer: Observer, cmd: EventCommand, *, sender: EventSender,
                 max_data_bytes: int, list_field_bytes: int) -> Any:
    match cmd:
        case c.SendEvent():
            one = await sender.submit(_checked(cmd.name, cmd.data, cmd.idempotency_key,
                                               max_data_bytes))
            _count(observer, [one])
            return _result(one)
        case c.SendEvents():
            if len(cmd.events) > MAX_EVENTS_BATCH:
                raise BadRequest(f"at most {MAX_EVENTS_BATCH} events per batch, got "
                                 f"{len(cmd.events)}", details={"limit": MAX_EVENTS_BATCH})
            events = []
            for i, spec in enumerate(cmd.events):
                try:
                    events.append(_checked(spec.name, spec.data, spec.idempotency_key,
                                           max_data_bytes))
                except JobdError as exc:
                    exc.details["index"] = i
                    raise
            sent = await _send(store, observer, events) if events else []
            return c.SendEventsResult(events=[_result(s) for s in sent])
        case c.ListEvents():
            rows = await store.list_events(cmd.name, cmd.cursor, cmd.limit, list_field_bytes)
            more = len(rows) == cmd.limit
            return c.EventsPage(events=[_view(r) for r in rows],
                                next_cursor=rows[-1]["id"] if more else None)
    raise JobdError(f"unhandled command {type(cmd).__name__}", code=ErrorCode.UNKNOWN_COMMAND)


def _checked(name: str, data: dict[str, Any], key: str | None, limit: int) -> EventToSend:
    encoded = msgspec.json.encode(data)
    if len(encoded) > limit:
        raise JobdError(
            f"data: {len(encoded)} bytes of JSON is over the limit of {limit} bytes "
            "(limits.max_args_bytes)", code=ErrorCode.TOO_LARGE,
            details={"field": "data", "bytes": len(encoded), "limit": limit})
    if has_nul(encoded):
        raise BadRequest("data: contains a NUL character (\\u0000), which Postgres cannot "
                         "store", details={"field": "data"})
    return EventToSend(name, encoded.decode(), key)


async def _send(store: Store, observer: Observer, events: list[EventToSend]) -> list[EventSent]:
    sent = await store.send_events(events)
    _count(observer, sent)
    return sent


def _count(observer: Observer, sent: list[EventSent]) -> None:
    started: dict[str, int] = {}
    for s in sent:
        for kind in s.started_kinds:
            started[kind] = started.get(kind, 0) + 1
    observer.events_sent(sum(s.created for s in sent), sum(not s.created for s in sent),
                         started)


def _result(sent: EventSent) -> c.SendEventResult:
    return c.SendEventResult(id=sent.id, woken=sent.woken, created=sent.created,
                             started=sent.started, cancelled=sent.cancelled)


def _view(row: dict[str, Any]) -> EventView:
    data = row["data"]
    return EventView(id=row["id"], name=row["name"], idempotency_key=row["idempotency_key"],
                     received_at=row["sent_at"].astimezone(UTC), jobs=list(row["jobs"]),
                     data=msgspec.json.decode(data) if data is not None else None,
                     truncated=[] if data is not None else ["data"])
