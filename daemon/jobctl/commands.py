"""What each `jobctl` subcommand sends, and what it prints: a human line or table, or
with `--json` the result Struct as JSON (one object; `watch` one per change)."""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import termios
import time
import tty
from typing import Any

import anyio
import msgspec

from daemon.jobctl import events, schedules, webhooks
from daemon.jobctl.render import (
    render_activity,
    render_job,
    render_keys,
    render_list,
    render_run,
    render_stats,
    render_top,
    render_tree,
)
from protocol import commands as c
from protocol.client import SyncClient, connect
from protocol.commands import FILTER_FIELDS
from protocol.jobs import JobSpec

BATCH_SIZE = 5000


def filters(args: argparse.Namespace) -> dict[str, Any]:
    chosen = {f: getattr(args, f, None) for f in FILTER_FIELDS if f != "ids"}
    ids = getattr(args, "ids", None)
    if ids:
        chosen["ids"] = ids
    return {k: v for k, v in chosen.items() if v is not None}


def run(args: argparse.Namespace, client: SyncClient) -> int:
    if args.command == "enqueue":
        return enqueue(args, client)
    result: Any
    match args.command:
        case "ping":
            result = client.call(c.Ping())
            human = f"pong from {result.daemon_id} (region {result.region}, jobd {result.version}," \
                    f" {'ready' if result.ready else 'NOT ready'}{', draining' if result.draining else ''})"
        case "tree":
            result = client.call(c.Tree())
            human = "\n".join(render_tree(result))
        case "stats":
            result = client.call(c.Stats())
            human = render_stats(result)
            if result.keys:
                human += "\n\n" + render_keys(result)
        case "nodes":
            result = client.call(c.Nodes())
            human = "\n".join(
                f"{d.id:40} {d.region:12} {d.version:8} {d.status:40} heartbeat {d.heartbeat_at:%H:%M:%S}"
                for d in result.daemons) or "no daemons"
        case "get":
            result = client.call(c.Get(job_id=args.id))
            human = render_job(result)
        case "inspect":
            result = client.call(c.Inspect(job_id=args.id))
            human = render_run(result)
        case "activity":
            result = client.call(c.Activity())
            human = render_activity(result)
        case "cancel" if len(args.ids) == 1 and not args.dry_run and not _has_filters(args):
            result = client.call(c.Cancel(job_id=args.ids[0]))
            human = f"job {result.id}: {result.was} -> {result.state}"
        case "cancel" | "retry" | "replay" | "delete":
            command: Any = {"cancel": c.CancelMany, "retry": c.Retry, "replay": c.Replay,
                       "delete": c.Delete}[args.command]
            result = client.call(command(dry_run=args.dry_run, **filters(args)))
            verb = {"cancel": "cancelled", "retry": "retried", "replay": "replayed",
                    "delete": "deleted"}[args.command]
            human = (f"{result.matched} jobs match (dry run: nothing changed)" if result.dry_run
                     else f"{result.changed} of {result.matched} matching jobs {verb}")
            if result.ids:
                human += "; new ids: " + " ".join(map(str, result.ids))
        case "list":
            result = client.call(c.List(limit=args.limit, cursor=args.cursor, **filters(args)))
            human = render_list(result)
        case "summary":
            result = client.call(c.Summary(**filters(args)))
            human = "  ".join(f"{k} {getattr(result, k)}" for k in
                              ("total", "queued", "running", "completed", "failed", "cancelled"))
        case "pause" | "resume":
            command = c.Pause if args.command == "pause" else c.Resume
            result = client.call(command(queue=args.queue, key=args.key))
            target = f"{args.queue}" + (f" key {args.key}" if args.key else "")
            human = f"{target}: {'paused' if result.paused else 'resumed'}"
        case "drain":
            result = client.call(c.Drain(undo=args.undo))
            human = f"{result.daemon_id}: {'draining' if result.draining else 'claiming'}"
        case "reload":
            result = client.call(c.Reload())
            human = result.message
        case "send-event":
            result, human = events.send(args, client)
        case "events":
            result, human = events.run(args, client)
        case "watch":
            return watch(args, client)
        case "top":
            return top(args, client)
        case "schedules":
            result, human = schedules.run(args, client)
        case "webhooks":
            result, human = webhooks.run(args, client)
    emit(args, result, human)
    return 0


def enqueue(args: argparse.Namespace, client: SyncClient) -> int:
    options = {"queue": args.queue, "key": args.key, "priority": args.priority,
               "delay_s": args.delay, "max_attempts": args.max_attempts,
               "timeout_s": args.timeout_s, "tags": args.tags, "cost": args.cost}
    if args.args_file is None:
        spec = JobSpec(kind=args.kind, args=_json_object(args.args), unique_key=args.unique_key,
                       **options)
        done = client.call(c.Enqueue(job=spec))
        if getattr(done, "warning", None):
            print(f"jobctl: warning: {done.warning}", file=sys.stderr)
        if done.outcome not in (None, "created"):  # a flow-control tool's doing
            print(f"jobctl: {done.outcome.replace('_', ' ')} (job {done.id})", file=sys.stderr)
        if args.json:
            print(msgspec.json.encode(client.call(c.Get(job_id=done.id))).decode())
        else:
            print(done.id)
        return 0
    if args.unique_key:
        raise ValueError("--unique-key applies to one job; put unique keys in a batch per line")
    ids: list[int] = []
    created = 0
    batch: list[JobSpec] = []
    done = None
    with args.args_file.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                batch.append(JobSpec(kind=args.kind, args=_json_object(line), **options))
            except ValueError as exc:
                raise ValueError(f"{args.args_file}:{number}: {exc}") from None
            if len(batch) >= BATCH_SIZE:
                done = client.call(c.EnqueueBatch(jobs=batch))
                ids += done.ids
                created += done.created
                batch = []
    if batch:
        done = client.call(c.EnqueueBatch(jobs=batch))
        ids += done.ids
        created += done.created
    if getattr(done, "warning", None):
        print(f"jobctl: warning: {done.warning}", file=sys.stderr)
    emit(args, {"ids": ids, "created": created},
         f"enqueued {created} jobs ({len(ids) - created} already queued under their unique key)")
    return 0


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"args are not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("args must be a JSON object")
    return value


def emit(args: argparse.Namespace, result: Any, human: str) -> None:
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        print(human)


def _has_filters(args: argparse.Namespace) -> bool:
    return any(v for k, v in filters(args).items() if k != "ids")


def watch(args: argparse.Namespace, client: SyncClient) -> int:
    async def follow() -> None:
        async with connect(client.socket_path, timeout=client.timeout) as conn:
            async for job in conn.watch(args.id):
                if args.json:
                    print(msgspec.json.encode(job).decode(), flush=True)
                else:
                    progress = f" {job.progress:.0f}%" if job.progress is not None else ""
                    note = f" {job.progress_note}" if job.progress_note else ""
                    print(f"job {job.id} {job.state} attempt {job.attempt}{progress}{note}",
                          flush=True)

    anyio.run(follow)
    return 0


def top(args: argparse.Namespace, client: SyncClient) -> int:
    """Redraws in place (ANSI) until `q` or Ctrl-C; `--once` prints a single frame."""
    keys = _Keys() if not args.once and sys.stdin.isatty() else None
    try:
        while True:
            frame = render_top(client.call(c.Stats()),
                               client.call(c.List(state=["running"], limit=20)))
            if args.once:
                print(frame)
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n\n(q or Ctrl-C to quit)\n")
            sys.stdout.flush()
            if keys is None:
                time.sleep(args.interval)
            elif keys.wait_for_quit(args.interval):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if keys is not None:
            keys.restore()


class _Keys:
    """The terminal in cbreak mode (keys arrive unbuffered, Ctrl-C still interrupts)."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self._fd)
        tty.setcbreak(self._fd)

    def wait_for_quit(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True once `q` is pressed."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._fd], [], [], left)
            if readable:
                key = os.read(self._fd, 32)
                if not key or b"q" in key.lower():
                    return True
        return False

    def restore(self) -> None:
        termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
