"""Durable workflows: the model, and the values a workflow hands around (`Suspend`,
`Child`, `ChildResult`, the store they need). The steps themselves are
actors/workflow_context.py (`ctx.step`, `ctx.sleep`, `ctx.spawn`, `ctx.gather`,
`ctx.wait_for_event`).

The model is replay (Inngest, DBOS), not coroutine pickling. A handler runs from the top
every time its job runs; each step's result is stored in `jobd.job_steps` when it
completes, and a later run returns the stored result instead of running the step again.
The job's steps are loaded in one query the first time a run touches a step, so a
memoized step costs a dictionary lookup and a decode, no round trip.

Waiting frees the worker slot: `sleep`, `gather` and `wait_for_event` raise `Suspend`,
which ends the run; what they wait for (the sleep's wake-up time, the wait's start and
deadline, the job's `waiting_on`) is written by the finish that suspends the job, in the
completer's batched statement, so a suspension costs no statement of its own. The worker turns it into an outcome
that does not count as an attempt: `scheduled` at the wake-up time for a sleep, `waiting`
for children and events. Postgres wakes a waiting job (triggers in 0005_workflows.sql;
the reaper's `wake_waiting` is the safety net) and the next run replays up to the wait,
which now returns.

Handlers must be deterministic in the order and names of their steps: step names may
carry loop variables (f"analyse:{ticker}"), and unnamed spawns/gathers/waits are
numbered in call order. Side effects belong inside steps. A step runs at least once:
a crash after its effect and before its result is stored runs it again.
"""

from __future__ import annotations

from typing import Any

import msgspec

from actors.ports import Outcome
from protocol.workflows import ChildView, StepView, WorkflowView

FINISHED = ("completed", "failed", "cancelled")
# Sleeps this short are slept in place: suspending costs more than it frees.
INLINE_SLEEP_S = 1.0
# A step's retry delay longer than this is left to the job's own retry (slot freed).
MAX_INLINE_RETRY_S = 30.0


class Suspend(BaseException):  # noqa: N818 - control flow, like trio.Cancelled
    """Ends this run of a handler; the job resumes later. A BaseException so that a
    handler's `except Exception` does not swallow it."""

    def __init__(self, state: str, delay_s: float | None, reason: str,
                 waiting_on: str | None = None):
        super().__init__(reason)
        self.state = state  # "scheduled" (a sleep) | "waiting" (children, event)
        self.delay_s = delay_s
        self.reason = reason
        self.waiting_on = waiting_on  # JSON, set by the finish that suspends

    def outcome(self, job_id: int, token: int) -> Outcome:
        # refund=1: a suspension is not an attempt.
        return Outcome(id=job_id, token=token, state=self.state, delay_s=self.delay_s, refund=1,
                       waiting_on=self.waiting_on)


def only_suspends(group: BaseExceptionGroup) -> Suspend | None:
    """A group made only of Suspends (steps waiting in a nursery) ends the run as one."""
    matched, rest = group.split(Suspend)
    if matched is None or rest is not None:
        return None
    leaves = _leaves(matched)
    waiting = [s for s in leaves if s.state == "waiting"]
    if waiting:
        return waiting[0]
    return min(leaves, key=lambda s: s.delay_s or 0.0)


def _leaves(group: BaseExceptionGroup) -> list[Suspend]:
    out: list[Suspend] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]  # type: ignore[list-item]
    return out


class Child(msgspec.Struct, kw_only=True):
    """One child job for `ctx.spawn_many`; unset options take the child handler's."""

    kind: str
    args: Any = {}
    queue: str | None = None
    key: str | None = None
    priority: int | None = None
    delay_s: float | None = None
    max_attempts: int | None = None
    tags: list[str] = []
    timeout_s: float | None = None


class ChildResult(msgspec.Struct, kw_only=True):
    """A finished child as `ctx.gather` returns it; the parent decides what failure means."""

    id: int
    kind: str
    state: str  # completed | failed | cancelled
    result: Any = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.state == "completed"


# -- helpers -------------------------------------------------------------------------------


def maybe_json(raw: str | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


async def workflow_view(store: Any, view: Any) -> Any:
    """A JobView with the job's steps, children and wait (`jobctl get`); one round trip."""
    waiting_on, steps, children = await store.workflow_details(view.id)
    fields = {f: getattr(view, f) for f in view.__struct_fields__}
    return WorkflowView(
        **fields,
        steps=msgspec.json.decode(steps, type=list[StepView]),
        children=msgspec.json.decode(children, type=list[ChildView]),
        waiting_on=maybe_json(waiting_on),
    )
