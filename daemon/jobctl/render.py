"""`jobctl`'s human output: tables and trees from the result Structs (`jobd demo` draws
its live view with `render_top` too)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import msgspec

from protocol import commands as c
from protocol.tree import TreeNode
from protocol.workflows import describe_wait, render_workflow


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
        f"state: {job.state}{_callback_wait(job)}  attempt {job.attempt}/{job.max_attempts}  "
        f"priority {job.priority}",
        f"args: {json.dumps(job.args)}",
    ]
    if job.progress is not None:
        bar = "#" * int(job.progress / 5)
        lines.append(f"progress: [{bar:20}] {job.progress:.0f}% {job.progress_note or ''}")
    if job.result is not None:
        lines.append(f"result: {json.dumps(job.result)}")
    if job.tags:
        lines.append(f"tags: {', '.join(job.tags)}")
    if getattr(job, "event_id", None) is not None:
        lines.append(f"started by event {job.event_id}")
    for err in job.errors:
        lines.append(f"attempt {err.attempt}: {err.error_class}: {err.message}")
    lines += render_workflow(job)
    return "\n".join(lines)


def _callback_wait(job: Any) -> str:
    deadline = getattr(job, "callback_deadline", None)
    return "" if deadline is None else f" (waiting for its HTTP callback until {deadline:%Y-%m-%d %H:%M:%S %Z})"


def render_run(run: c.RunDetail) -> str:
    """`jobctl inspect`: the job as `get` prints it, then its steps as a table with
    durations, what it waits for, its parent, children and the event that started it."""
    # The event line below names the event too: get's "started by event N" would repeat it.
    lines = [render_job(msgspec.structs.replace(run.job, event_id=None))]
    if run.parent_id is not None:
        lines.append(f"parent: job {run.parent_id}")
    if run.event is not None:
        lines.append(f"event: {run.event.id} {run.event.name!r} sent "
                     f"{run.event.sent_at:%Y-%m-%d %H:%M:%S}")
    elif run.job.event_id is not None:
        lines.append(f"event: {run.job.event_id} (pruned)")
    if run.steps:
        lines.append(f"steps ({len(run.steps)} of {run.steps_total}):")
        lines.append(f"  {'name':32} {'status':8} {'tries':>5}  {'started':8}  {'duration':>10}"
                     "  result")
        for s in run.steps:
            status = "done" if s.done else ("failed" if s.error else "pending")
            took = f"{s.duration_s:.3f}s" if s.duration_s is not None else "-"
            if s.error:
                shown = f"{s.error.get('class', '?')}: {s.error.get('message', '')}"
            elif "result" in s.truncated or "error" in s.truncated:
                shown = "(too large: " + ", ".join(s.truncated) + " left out; see get)"
            else:
                shown = json.dumps(s.result)
            lines.append(f"  {s.name[:32]:32} {status:8} {s.attempts:>5}  "
                         f"{s.started_at:%H:%M:%S}  {took:>10}  {shown[:60]}")
    if run.waiting_on:
        lines.append(f"waiting for: {describe_wait(run.waiting_on)}")
    if run.children:
        lines.append(f"children ({len(run.children)} of {run.children_total}):")
        for child in run.children:
            lines.append(f"  {child.id:>8}  {child.kind[:28]:28} {child.state:10} "
                         f"attempt {child.attempt}")
    return "\n".join(lines)


def render_activity(result: c.ActivityResult) -> str:
    """`jobctl activity`: per queue, the hour's totals, completed/failed per bucket
    (oldest first) and how long the head of the queue has waited."""
    first, last = result.bucket_starts[0], result.bucket_starts[-1]
    lines = [f"last hour in {result.bucket_s // 60}-minute buckets, "
             f"{first:%H:%M}..{last:%H:%M} (oldest first; completed/failed)",
             f"{'queue':20} {'done':>6} {'failed':>6}  {'per bucket':60}  oldest waiting"]
    for q in result.queues:
        buckets = " ".join(f"{d}/{f}" for d, f in zip(q.completed, q.failed, strict=True))
        oldest = (f"job {q.oldest_available_id}, {q.oldest_wait_s:.1f}s"
                  if q.oldest_available_id is not None and q.oldest_wait_s is not None else "-")
        lines.append(f"{q.queue[:20]:20} {sum(q.completed):>6} {sum(q.failed):>6}  "
                     f"{buckets:60}  {oldest}")
    if not result.queues:
        lines.append("  (nothing finished in the last hour, nothing waiting)")
    return "\n".join(lines)
