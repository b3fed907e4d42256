"""Events that start functions: what `@job(on_event=..., cancel_on=...)` declares, and the
subscriptions a daemon writes into Postgres from it.

A send runs in SQL (jobd.send_event, so an application can send inside its own
transaction), so what decides which jobs an event starts or cancels must be something
Postgres can evaluate: a filter is a match dict (the event's data must contain it,
`data @> match`), a cancel names args fields that must equal the data's, and the key of
an event-started job is a path into the data. A Python key function cannot run there,
so a kind started by events must declare its key as a path (`key="marketplace"`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from actors.jobdef import JobDef
from actors.ports import Subscription
from protocol.events import EVENT_NAME_PATTERN

_NAME = re.compile(EVENT_NAME_PATTERN)
_FIELD = re.compile(r"^[^\x00]{1,200}$")


def triggers(kind: str, on_event: Any) -> list[tuple[str, dict[str, Any]]]:
    """`on_event` as (name, match) pairs: a name, {"event": name, "match": {...}}, or a
    list of either. Raises TypeError/ValueError naming the kind."""
    if on_event is None:
        return []
    items = on_event if isinstance(on_event, list | tuple) else [on_event]
    out: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        match: Any
        if isinstance(item, str):
            name, match = item, {}
        elif isinstance(item, dict):
            unknown = set(item) - {"event", "match"}
            if unknown or "event" not in item:
                raise TypeError(f"{kind}: on_event entries are a name or "
                                f"{{'event': name, 'match': {{...}}}}, got {item!r}")
            name, match = item["event"], item.get("match") or {}
        else:
            raise TypeError(f"{kind}: on_event must be an event name, a dict or a list of "
                            f"them, got {type(item).__name__}")
        out.append((_event_name(kind, name), _match(kind, match)))
    if len({name for name, _ in out}) != len(out):
        raise ValueError(f"{kind}: on_event names an event twice")
    return out


def cancels(kind: str, cancel_on: Any) -> list[tuple[str, list[str]]]:
    """`cancel_on` as (name, fields) pairs: [{"event": name, "match": "field" or
    ["f1", "f2"]}, ...]. Fields are top-level args fields the event's data must carry,
    with equal values."""
    if cancel_on is None:
        return []
    items = cancel_on if isinstance(cancel_on, list | tuple) else [cancel_on]
    out: list[tuple[str, list[str]]] = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"event", "match"}:
            raise TypeError(f"{kind}: cancel_on entries are {{'event': name, 'match': "
                            f"'field' or ['field', ...]}}, got {item!r}")
        fields = [item["match"]] if isinstance(item["match"], str) else item["match"]
        if (not isinstance(fields, list | tuple) or not fields
                or not all(isinstance(f, str) and _FIELD.match(f) for f in fields)):
            raise ValueError(f"{kind}: cancel_on match must be a field name or a non-empty "
                             f"list of them, got {item['match']!r}")
        out.append((_event_name(kind, item["event"]), sorted(set(fields))))
    if len({name for name, _ in out}) != len(out):
        raise ValueError(f"{kind}: cancel_on names an event twice")
    return out


def subscriptions(jobdefs: Iterable[JobDef]) -> list[Subscription]:
    """Every (event, kind, action) the declarations make, with the job options the
    kind's declaration sets (`handlers.registered().values()`)."""
    out: list[Subscription] = []
    for jobdef in jobdefs:
        for name, match in jobdef.on_event:
            out.append(Subscription(
                event=name, kind=jobdef.kind, action="start", match=match,
                queue=jobdef.queue, priority=jobdef.priority,
                max_attempts=jobdef.max_attempts, timeout_s=jobdef.timeout_s,
                key_path=key_path(jobdef)))
        for name, fields in jobdef.cancel_on:
            out.append(Subscription(event=name, kind=jobdef.kind, action="cancel",
                                    fields=fields, queue=jobdef.queue))
    return sorted(out, key=lambda s: (s.event, s.kind, s.action))


def key_path(jobdef: JobDef) -> list[str] | None:
    return jobdef.key.split(".") if isinstance(jobdef.key, str) else None


def _event_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind}: event name {name!r} must be 1 to 200 characters of "
                         "A-Z a-z 0-9 _ . : / @ -")
    return name


def _match(kind: str, match: Any) -> dict[str, Any]:
    if not isinstance(match, dict):
        raise TypeError(f"{kind}: an on_event match is a dict the event's data must "
                        f"contain, got {type(match).__name__}")
    try:
        encoded = msgspec.json.encode(match)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{kind}: the on_event match is not JSON: {exc}") from None
    if b"\\u0000" in encoded:
        raise ValueError(f"{kind}: the on_event match contains a NUL character")
    decoded: dict[str, Any] = msgspec.json.decode(encoded)
    return decoded
