"""`jobctl send-event` and `jobctl events list`: events are sent to (and kept in)
Postgres through the daemon like any other command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from protocol import commands as c
from protocol.client import SyncClient
from protocol.events import MAX_EVENTS_BATCH, EventSpec, EventView


def add_send_parser(send: argparse.ArgumentParser) -> None:
    send.add_argument("name", nargs="?", help="the event's name (not with --file)")
    send.add_argument("--data", default="{}",
                      help="JSON object: the started jobs' args, matched by filters and waits")
    send.add_argument("--id", dest="idempotency_key",
                      help="idempotency key: a repeat within events.dedup_window does nothing")
    send.add_argument("--file", type=Path,
                      help='one event per line, {"name": ..., "data": {...}, '
                           '"idempotency_key": ...}; sent in batches of '
                           f"{MAX_EVENTS_BATCH} (one transaction each)")


def add_list_parser(events: argparse.ArgumentParser) -> None:
    sub = events.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="recent events: name, id, received, the jobs each started")
    listing.add_argument("--name", help="only events of this name")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--cursor", type=int, help="older than this event id")


def send(args: argparse.Namespace, client: SyncClient) -> tuple[Any, str]:
    """(result, human text) for `emit`."""
    if args.file is not None:
        if args.name is not None or args.idempotency_key is not None or args.data != "{}":
            raise ValueError("--file takes each event's name, data and id from its lines")
        return _send_file(args.file, client)
    if args.name is None:
        raise ValueError("send-event needs a NAME (or --file)")
    result = client.call(c.SendEvent(name=args.name, data=_data(args.data),
                                     idempotency_key=args.idempotency_key))
    return result, _describe(result)


def run(args: argparse.Namespace, client: SyncClient) -> tuple[Any, str]:
    result = client.call(c.ListEvents(name=args.name, cursor=args.cursor, limit=args.limit))
    return result, render(result.events, result.next_cursor)


def render(events: list[EventView], next_cursor: int | None) -> str:
    if not events:
        return "no events"
    lines = [f"{'ID':>10}  {'NAME':32} {'IDEMPOTENCY KEY':24} {'RECEIVED':20} JOBS"]
    for e in events:
        jobs = " ".join(map(str, e.jobs)) or "-"
        lines.append(f"{e.id:>10}  {e.name[:32]:32} {(e.idempotency_key or '-')[:24]:24} "
                     f"{e.received_at:%Y-%m-%d %H:%M:%S}  {jobs}")
    if next_cursor is not None:
        lines.append(f"(more: --cursor {next_cursor})")
    return "\n".join(lines)


def _describe(result: c.SendEventResult) -> str:
    if not result.created:
        return f"event {result.id}: already sent with this id (nothing started)"
    parts = [f"event {result.id} sent"]
    parts.append(f"started {len(result.started)} job(s)"
                 + (": " + " ".join(map(str, result.started)) if result.started else ""))
    if result.cancelled:
        parts.append(f"cancelled {' '.join(map(str, result.cancelled))}")
    parts.append(f"woke {len(result.woken)} job(s)"
                 + (": " + " ".join(map(str, result.woken)) if result.woken else ""))
    return "; ".join(parts)


def _send_file(path: Path, client: SyncClient) -> tuple[Any, str]:
    sent: list[c.SendEventResult] = []
    batch: list[EventSpec] = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                batch.append(_spec(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            if len(batch) == MAX_EVENTS_BATCH:
                sent += client.call(c.SendEvents(events=batch)).events
                batch = []
    if batch:
        sent += client.call(c.SendEvents(events=batch)).events
    created = sum(s.created for s in sent)
    started = sum(len(s.started) for s in sent)
    return c.SendEventsResult(events=sent), (
        f"sent {created} events ({len(sent) - created} repeats of an id), "
        f"started {started} jobs")


def _spec(line: str) -> EventSpec:
    value = json.loads(line)
    if not isinstance(value, dict) or set(value) - {"name", "data", "idempotency_key"}:
        raise ValueError('each line must be {"name": ..., "data": {...}, "idempotency_key": ...}')
    if not isinstance(value.get("name"), str):
        raise ValueError("name must be a string")
    return EventSpec(name=value["name"], data=_data(json.dumps(value.get("data", {}))),
                     idempotency_key=value.get("idempotency_key"))


def _data(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"data is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("data must be a JSON object")
    return value
