"""What `get` shows of a durable workflow: its steps, its children, what it waits for."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from protocol.jobs import JobView


class StepView(msgspec.Struct, kw_only=True):
    name: str
    done: bool
    attempts: int
    started_at: datetime
    finished_at: datetime | None  # a sleep's is its wake-up time
    error: dict[str, Any] | None = None
    result_bytes: int | None = None


class ChildView(msgspec.Struct, kw_only=True):
    id: int
    kind: str
    state: str
    attempt: int
    created_at: datetime
    finished_at: datetime | None


class WorkflowView(JobView, kw_only=True):
    """A job plus its workflow; the extra fields are empty for plain jobs (and from
    daemons that predate workflows)."""

    steps: list[StepView] = []
    children: list[ChildView] = []
    waiting_on: dict[str, Any] | None = None


def render_workflow(job: Any) -> list[str]:
    """`jobctl get` lines for a workflow's steps, children and wait (none for plain jobs)."""
    lines: list[str] = []
    steps = getattr(job, "steps", [])
    if steps:
        lines.append(f"steps ({len(steps)}):")
        now = datetime.now(tz=steps[0].started_at.tzinfo)
        for s in steps:
            if s.name.startswith("sleep:") and s.finished_at is not None:
                left = (s.finished_at - now).total_seconds()
                status = f"sleeping, {left:.1f}s left" if left > 0 else "slept"
                took = f"until {s.finished_at:%H:%M:%S}"
            elif s.done and s.finished_at is not None:
                status, took = "done", f"{(s.finished_at - s.started_at).total_seconds():.3f}s"
            elif s.error:
                status, took = f"failed ({s.error.get('class', '?')})", s.error.get("message", "")[:60]
            else:
                status, took = "waiting", f"since {s.started_at:%H:%M:%S}"
            tries = f" x{s.attempts}" if s.attempts > 1 else ""
            lines.append(f"  {s.name[:40]:40} {status:24} {took}{tries}")
    children = getattr(job, "children", [])
    if children:
        by_state: dict[str, int] = {}
        for c in children:
            by_state[c.state] = by_state.get(c.state, 0) + 1
        lines.append("children: " + ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())))
        for c in children[:20]:
            lines.append(f"  {c.id:>8}  {c.kind[:28]:28} {c.state:10} attempt {c.attempt}")
        if len(children) > 20:
            lines.append(f"  ... {len(children) - 20} more")
    waiting_on = getattr(job, "waiting_on", None)
    if waiting_on:
        lines.append(f"waiting for: {describe_wait(waiting_on)}")
    return lines


def describe_wait(waiting_on: dict[str, Any]) -> str:
    """What a waiting job waits for (jobs.waiting_on), in words."""
    if waiting_on.get("type") == "children":
        return f"{len(waiting_on.get('ids', []))} children ({waiting_on.get('step')})"
    what = f"event {waiting_on.get('name')!r} matching {waiting_on.get('match') or {}}"
    if waiting_on.get("deadline"):
        what += f", until {datetime.fromtimestamp(waiting_on['deadline']):%Y-%m-%d %H:%M:%S}"
    return what
