"""`jobctl schedules list|add|remove|pause|resume|trigger`: schedules live in Postgres,
so these are commands to the daemon like any other."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from protocol import commands as c
from protocol.client import SyncClient
from protocol.schedules import ScheduleSpec, ScheduleView


def add_parser(schedules: argparse.ArgumentParser) -> None:
    sub = schedules.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every schedule with its next and last fire time")
    add = sub.add_parser("add", help="add a schedule (kept in Postgres, survives restarts)")
    add.add_argument("name")
    add.add_argument("--kind", required=True)
    timing = add.add_mutually_exclusive_group(required=True)
    timing.add_argument("--cron", help='5 fields, local time in --tz, e.g. "0 6 * * *"')
    timing.add_argument("--every", help="fixed interval, e.g. 10s, 5m")
    add.add_argument("--tz", default="UTC")
    add.add_argument("--args", default="{}", help="JSON object of handler args")
    add.add_argument("--queue")
    add.add_argument("--key", help="flow-control key")
    add.add_argument("--priority", type=int)
    add.add_argument("--max-attempts", type=int)
    add.add_argument("--timeout-s", type=float)
    add.add_argument("--tag", action="append", default=[], dest="tags")
    add.add_argument("--jitter", help="start each job up to this much later, e.g. 30s")
    add.add_argument("--missed", choices=("skip", "latest", "all"), default="latest")
    add.add_argument("--missed-limit", type=int, default=100)
    add.add_argument("--grace", default="60s")
    add.add_argument("--replace", action="store_true", help="overwrite an existing schedule")
    for name, text in (("remove", "delete a schedule"), ("pause", "stop firing"),
                       ("resume", "fire again (from now on; paused occurrences are not made up)")):
        sub.add_parser(name, help=text).add_argument("name")
    trigger = sub.add_parser("trigger", help="fire one extra occurrence now")
    trigger.add_argument("name")
    trigger.add_argument("--at", type=_moment, help="the occurrence to fire (ISO time)")


def run(args: argparse.Namespace, client: SyncClient) -> tuple[Any, str]:
    """(result, human text) for `emit`."""
    match args.action:
        case "list":
            result = client.call(c.ScheduleList())
            return result, render(result.schedules)
        case "add":
            args_obj = json.loads(args.args)
            if not isinstance(args_obj, dict):
                raise ValueError("--args must be a JSON object")
            spec = ScheduleSpec(
                name=args.name, kind=args.kind, cron=args.cron, every=args.every, tz=args.tz,
                args=args_obj, queue=args.queue, key=args.key, priority=args.priority,
                max_attempts=args.max_attempts, timeout_s=args.timeout_s, tags=args.tags,
                jitter=args.jitter, missed=args.missed, missed_limit=args.missed_limit,
                grace=args.grace)
            result = client.call(c.ScheduleAdd(schedule=spec, replace=args.replace))
            return result, render([result])
        case "remove":
            result = client.call(c.ScheduleRemove(name=args.name))
            return result, f"schedule {result.name} removed"
        case "pause" | "resume":
            command = c.SchedulePause if args.action == "pause" else c.ScheduleResume
            result = client.call(command(name=args.name))
            return result, render([result])
        case "trigger":
            result = client.call(c.ScheduleTrigger(name=args.name, at=args.at))
            if result.created:
                return result, f"fired {result.name} for {result.fire_at.isoformat()}: job {result.job_id}"
            return result, f"{result.name} had already fired for {result.fire_at.isoformat()}"
    raise ValueError(f"unknown action {args.action!r}")


def render(schedules: list[ScheduleView]) -> str:
    if not schedules:
        return "no schedules"
    head = f"{'name':24} {'when':24} {'tz':18} {'kind':22} {'next fire':26} {'last fire':26} state"
    rows = [head]
    for s in schedules:
        # every_s is null in JSON for a stored NaN (a row that slipped past the CHECK)
        every = "?" if s.every_s is None else f"{s.every_s:g}"
        when = s.cron if s.cron is not None else f"every {every}s"
        state = "paused" if s.paused else "active"
        if s.broken:
            state = f"broken: {s.broken}"
        rows.append(f"{s.name:24} {when:24} {s.tz:18} {s.kind:22} {_t(s.next_fire_at):26} "
                    f"{_t(s.last_fire_at):26} {state} ({s.source})")
    return "\n".join(rows)


def _t(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

