"""`jobctl`'s command line: the arguments, and the one place an error becomes an exit status.

Exit status: 0 ok, 1 an error from jobd (or jobd unreachable), 2 bad usage, 130 Ctrl-C.
An error is one line on stderr (`jobctl: <code>: <message>`), or with `--json` the error
envelope on stdout; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon.jobctl import events, schedules, webhooks
from daemon.jobctl.commands import run
from protocol.client import SyncClient, default_socket
from protocol.durations import parse_duration
from protocol.errors import JobdError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobctl", description="control a running jobd")
    p.add_argument("--socket", "-s", default=None,
                   help="control socket (default: $JOBD_SOCKET, else <state dir>/jobd.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=30.0)
    # `--json` works before or after the subcommand (`jobctl --json get 1`, `jobctl get 1 --json`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    command("ping", "is the daemon up and ready")
    command("tree", "the live supervisor tree")
    command("stats", "job counts per queue and state")
    command("nodes", "daemons sharing this database")
    enq = command("enqueue", "enqueue one job, or a batch from --args-file")
    enq.add_argument("kind")
    src = enq.add_mutually_exclusive_group()
    src.add_argument("--args", default="{}", help="JSON object of handler args")
    src.add_argument("--args-file", type=Path,
                     help="one JSON args object per line; enqueued in large batches")
    enq.add_argument("--queue")
    enq.add_argument("--key", help="flow-control key (marketplace, model, ...)")
    enq.add_argument("--unique-key")
    enq.add_argument("--delay", type=duration,
                     help="run this long from now (90s, 5m, 2h; a plain number is seconds)")
    enq.add_argument("--priority", type=int, help="lower runs first")
    enq.add_argument("--max-attempts", type=int)
    enq.add_argument("--timeout-s", type=float)
    enq.add_argument("--cost", type=int, help="weight against the key's tokens_per_minute")
    enq.add_argument("--tag", action="append", default=[], dest="tags")
    get = command("get", "one job: state, attempts, progress, result, errors")
    get.add_argument("id", type=int)
    inspect = command("inspect", "one run in detail: steps with durations, wait, children, event")
    inspect.add_argument("id", type=int)
    command("activity", "the last hour per queue: completed/failed per 5 minutes, oldest waiting")
    watch = command("watch", "follow one job until it finishes")
    watch.add_argument("id", type=int)
    listing = command("list", "jobs matching filters, newest first")
    add_filters(listing)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--cursor", type=int, help="next_cursor from the previous page")
    add_filters(command("summary", "counts per state for the matching jobs (e.g. --tag 2025-10-14)"))
    for name, text in (("cancel", "cancel jobs: by id, or every job matching filters"),
                       ("retry", "run failed/cancelled/scheduled jobs again now"),
                       ("replay", "enqueue a new run of finished jobs"),
                       ("delete", "delete jobs that are not running")):
        bulk = command(name, text)
        bulk.add_argument("ids", type=int, nargs="*", help="job ids (or use filters)")
        add_filters(bulk)
        bulk.add_argument("--dry-run", action="store_true", help="only count the matches")
    for name, text in (("pause", "stop claiming a queue (or one key of it), on every daemon"),
                       ("resume", "undo pause")):
        pause = command(name, text)
        pause.add_argument("queue")
        pause.add_argument("--key")
    drain = command("drain", "stop claiming on this daemon (running jobs finish); for deploys")
    drain.add_argument("--undo", action="store_true", help="start claiming again")
    command("reload", "re-read the config file (like SIGHUP)")
    events.add_send_parser(command(
        "send-event", "send an event: starts its subscribed functions, cancels and wakes jobs"))
    events.add_list_parser(command("events", "recent events and the jobs they started"))
    schedules.add_parser(command("schedules", "list, add, remove, pause, resume, trigger"))
    webhooks.add_parser(command("webhooks", "completion webhook deliveries: list, replay"))
    top = command("top", "live view of queues and running jobs")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    return p


def add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue")
    p.add_argument("--kind")
    p.add_argument("--state", action="append", help="repeatable")
    p.add_argument("--key")
    p.add_argument("--tag")
    p.add_argument("--unique-key")
    p.add_argument("--error", metavar="TEXT",
                   help="text in an attempt's error message or traceback "
                        "(any case; %% and _ are plain characters)")
    for edge in ("created_after", "created_before", "finished_after", "finished_before"):
        p.add_argument("--" + edge.replace("_", "-"), type=when,
                       help="ISO time, or a duration meaning that long ago (24h)")


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def when(text: str) -> datetime:
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time or duration: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # One connection for every call the command makes (`top` keeps it across redraws
    # and opens a new one by itself after a daemon restart).
    client = SyncClient(args.socket or default_socket(), timeout=args.timeout)
    try:
        with client:
            return run(args, client)
    except JobdError as exc:
        if args.json:
            print(json.dumps({"error": {"code": str(exc.code), "message": exc.message,
                                        "details": exc.details}}))
        else:
            print(f"jobctl: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"jobctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for a user, never a traceback
        print(f"jobctl: internal: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
