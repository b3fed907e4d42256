"""`jobctl`: drive a running jobd. Human tables by default, `--json` everywhere.

Exit status: 0 ok, 1 an error from jobd (or jobd unreachable), 2 bad usage, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec

from daemon import jobctl_schedules
from protocol import commands as c
from protocol.client import SyncClient, connect, default_socket
from protocol.commands import FILTER_FIELDS
from protocol.durations import parse_duration
from protocol.errors import JobdError
from protocol.jobs import JobSpec
from protocol.tree import TreeNode
from protocol.workflows import render_workflow

BATCH_SIZE = 5000


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
    event = command("send-event", "send an event; wakes the workflows waiting for it")
    event.add_argument("name")
    event.add_argument("--data", default="{}", help="JSON object (matched with wait_for_event(match=...))")
    jobctl_schedules.add_parser(command("schedules", "list, add, remove, pause, resume, trigger"))
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


def filters(args: argparse.Namespace) -> dict[str, Any]:
    chosen = {f: getattr(args, f, None) for f in FILTER_FIELDS if f != "ids"}
    ids = getattr(args, "ids", None)
    if ids:
        chosen["ids"] = ids
    return {k: v for k, v in chosen.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    client = SyncClient(args.socket or default_socket(), timeout=args.timeout)
    try:
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
        case "cancel" if len(args.ids) == 1 and not args.dry_run and not _has_filters(args):
            result = client.call(c.Cancel(job_id=args.ids[0]))
            human = f"job {result.id}: {result.was} -> {result.state}"
        case "cancel" | "retry" | "replay" | "delete":
            command = {"cancel": c.CancelMany, "retry": c.Retry, "replay": c.Replay,
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
            result = client.call(c.SendEvent(name=args.name, data=_json_object(args.data)))
            human = f"event {result.id} sent; woke {len(result.woken)} job(s)" + (
                ": " + " ".join(map(str, result.woken)) if result.woken else "")
        case "watch":
            return watch(args, client)
        case "top":
            return top(args, client)
        case "schedules":
            result, human = jobctl_schedules.run(args, client)
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
        import termios
        import tty

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
        import termios

        termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)


def render_top(stats: c.StatsResult, running: c.JobsPage) -> str:
    lines = [f"jobd top  {datetime.now():%H:%M:%S}", "", render_stats(stats), "",
             f"{'id':>8}  {'kind':24} {'queue':12} {'key':14} {'attempt':>7}  progress"]
    for job in running.jobs:
        pct = job.progress or 0.0
        bar = "#" * int(pct / 5)
        lines.append(f"{job.id:>8}  {job.kind[:24]:24} {job.queue[:12]:12} "
                     f"{(job.key or '-')[:14]:14} {job.attempt:>7}  [{bar:20}] {pct:3.0f}% "
                     f"{job.progress_note or ''}")
    if not running.jobs:
        lines.append("  (nothing running)")
    return "\n".join(lines)


def render_list(page: c.JobsPage) -> str:
    rows = [f"{'id':>8}  {'kind':24} {'queue':12} {'state':10} {'attempt':>7}  created"]
    for job in page.jobs:
        rows.append(f"{job.id:>8}  {job.kind[:24]:24} {job.queue[:12]:12} {job.state:10} "
                    f"{job.attempt:>7}  {job.created_at:%Y-%m-%d %H:%M:%S}")
    if page.next_cursor is not None:
        rows.append(f"more: --cursor {page.next_cursor}")
    return "\n".join(rows)


def render_tree(node: TreeNode, prefix: str = "", last: bool = True, top: bool = True) -> list[str]:
    extra = f" [{node.strategy}]" if node.strategy else ""
    restarts = f", {node.restarts} restarts" if node.restarts else ""
    line = f"{node.name}{extra} {node.state}{restarts}"
    lines = [line if top else f"{prefix}{'└── ' if last else '├── '}{line}"]
    child_prefix = "" if top else prefix + ("    " if last else "│   ")
    for i, child in enumerate(node.children):
        lines += render_tree(child, child_prefix, i == len(node.children) - 1, top=False)
    return lines


def render_keys(result: c.StatsResult) -> str:
    rows = [f"{'queue':14} {'key':20} {'running':>7} {'queued':>8} {'limit':>6} "
            f"{'rate/s':>8} {'effective':>9}  {'paused until':20} breaker"]
    for k in result.keys:
        rate = f"{k.rate_limit:.3g}" if k.rate_limit is not None else "-"
        eff = f"{k.effective_rate:.3g}" if k.effective_rate is not None else "-"
        paused = f"{k.paused_until:%Y-%m-%d %H:%M:%S}" if k.paused_until else "-"
        limit = str(k.concurrency_limit) if k.concurrency_limit is not None else "-"
        rows.append(f"{k.queue[:14]:14} {k.key[:20]:20} {k.running:>7} {k.queued:>8} "
                    f"{limit:>6} {rate:>8} {eff:>9}  {paused:20} {k.breaker}")
    return "\n".join(rows)


def render_stats(result: c.StatsResult) -> str:
    states = ("scheduled", "available", "running", "waiting", "completed", "failed", "cancelled")
    head = f"{'queue':20}" + "".join(f"{s:>11}" for s in states) + f"{'here':>10}"
    rows = [head]
    for q in result.queues:
        here = f"{q.running_here}/{q.concurrency}" if q.concurrency else "-"
        rows.append(f"{q.queue:20}" + "".join(f"{q.counts.get(s, 0):>11}" for s in states)
                    + f"{here:>10}")
    return "\n".join(rows)


def render_job(job: Any) -> str:
    lines = [
        f"job {job.id}  {job.kind}  queue={job.queue}  key={job.key or '-'}",
        f"state: {job.state}  attempt {job.attempt}/{job.max_attempts}  priority {job.priority}",
        f"args: {json.dumps(job.args)}",
    ]
    if job.progress is not None:
        bar = "#" * int(job.progress / 5)
        lines.append(f"progress: [{bar:20}] {job.progress:.0f}% {job.progress_note or ''}")
    if job.result is not None:
        lines.append(f"result: {json.dumps(job.result)}")
    if job.tags:
        lines.append(f"tags: {', '.join(job.tags)}")
    for err in job.errors:
        lines.append(f"attempt {err.attempt}: {err.error_class}: {err.message}")
    lines += render_workflow(job)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
