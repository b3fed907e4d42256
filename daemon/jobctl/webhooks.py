"""`jobctl webhooks list|replay`: the completion webhooks' outbox lives in Postgres, so
these are commands to the daemon like any other."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from protocol import commands as c
from protocol.client import SyncClient
from protocol.webhooks import DELIVERY_STATES, DeliveryView


def add_parser(webhooks: argparse.ArgumentParser) -> None:
    sub = webhooks.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="outbox rows, newest first, with their delivery state")
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--failed", action="store_true", help="only rows whose retries ran out")
    which.add_argument("--state", choices=DELIVERY_STATES)
    listing.add_argument("--webhook", help="only this webhook's rows")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--cursor", type=int, help="next_cursor from the previous page")
    replay = sub.add_parser("replay", help="send rows again, with a fresh retry window")
    replay.add_argument("ids", type=int, nargs="*", help="outbox row ids (jobctl webhooks list)")
    replay.add_argument("--failed", action="store_true", help="every failed row")


def run(args: argparse.Namespace, client: SyncClient) -> tuple[Any, str]:
    """(result, human text) for `emit`."""
    match args.action:
        case "list":
            result = client.call(c.WebhookList(
                state="failed" if args.failed else args.state, webhook=args.webhook,
                limit=args.limit, cursor=args.cursor))
            text = render(result.deliveries)
            if result.next_cursor is not None:
                text += f"\nmore: --cursor {result.next_cursor}"
            return result, text
        case "replay":
            if not args.ids and not args.failed:
                raise ValueError("replay needs outbox ids or --failed")
            result = client.call(c.WebhookReplay(ids=args.ids, failed=args.failed))
            text = f"replayed {len(result.replayed)} row(s)"
            if result.refused:
                text += ("; not replayed (no such row, or no daemon declares its webhook): "
                         + " ".join(map(str, result.refused)))
            return result, text
    raise ValueError(f"unknown action {args.action!r}")


def render(rows: list[DeliveryView]) -> str:
    if not rows:
        return "no webhook deliveries"
    lines = [f"{'id':>8} {'webhook':20} {'event':10} {'job':>10} {'state':10} {'tries':>5} "
             f"{'last':26} {'next':26} last error"]
    for r in rows:
        status = f"HTTP {r.last_status}" if r.last_status is not None else ""
        error = r.last_error or status or "-"
        nxt = _t(r.next_attempt_at) if r.state == "pending" else "-"
        lines.append(f"{r.id:>8} {r.webhook:20} {r.event:10} {r.job_id:>10} {r.state:10} "
                     f"{r.attempts:>5} {_t(r.last_attempt_at):26} {nxt:26} {error[:80]}")
    return "\n".join(lines)


def _t(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
