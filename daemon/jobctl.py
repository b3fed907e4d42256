"""`jobctl`: drive a running jobd. Human tables by default, `--json` everywhere.

Exit status: 0 ok, 1 an error from jobd (or jobd unreachable), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from protocol import commands as c
from protocol.client import SyncClient, default_socket
from protocol.errors import JobdError
from protocol.jobs import JobSpec
from protocol.tree import TreeNode

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
    enq.add_argument("--delay", type=float, help="seconds from now")
    enq.add_argument("--priority", type=int, help="lower runs first")
    enq.add_argument("--max-attempts", type=int)
    enq.add_argument("--timeout-s", type=float)
    enq.add_argument("--tag", action="append", default=[], dest="tags")
    get = command("get", "one job: state, attempts, progress, result, errors")
    get.add_argument("id", type=int)
    cancel = command("cancel", "cancel a queued or running job")
    cancel.add_argument("id", type=int)
    return p


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
        case "nodes":
            result = client.call(c.Nodes())
            human = "\n".join(
                f"{d.id:40} {d.region:12} {d.version:8} {d.status:40} heartbeat {d.heartbeat_at:%H:%M:%S}"
                for d in result.daemons) or "no daemons"
        case "get":
            result = client.call(c.Get(job_id=args.id))
            human = render_job(result)
        case "cancel":
            result = client.call(c.Cancel(job_id=args.id))
            human = f"job {result.id}: {result.was} -> {result.state}"
    emit(args, result, human)
    return 0


def enqueue(args: argparse.Namespace, client: SyncClient) -> int:
    options = {"queue": args.queue, "key": args.key, "priority": args.priority,
               "delay_s": args.delay, "max_attempts": args.max_attempts,
               "timeout_s": args.timeout_s, "tags": args.tags}
    if args.args_file is None:
        spec = JobSpec(kind=args.kind, args=_json_object(args.args), unique_key=args.unique_key,
                       **options)
        done = client.call(c.Enqueue(job=spec))
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


def render_tree(node: TreeNode, prefix: str = "", last: bool = True, top: bool = True) -> list[str]:
    extra = f" [{node.strategy}]" if node.strategy else ""
    restarts = f", {node.restarts} restarts" if node.restarts else ""
    line = f"{node.name}{extra} {node.state}{restarts}"
    lines = [line if top else f"{prefix}{'└── ' if last else '├── '}{line}"]
    child_prefix = "" if top else prefix + ("    " if last else "│   ")
    for i, child in enumerate(node.children):
        lines += render_tree(child, child_prefix, i == len(node.children) - 1, top=False)
    return lines


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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
