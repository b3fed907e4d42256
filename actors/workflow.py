"""Durable workflows: what `ctx.step`, `ctx.sleep`, `ctx.spawn`, `ctx.gather` and
`ctx.wait_for_event` do.

The model is replay (Inngest, DBOS), not coroutine pickling. A handler runs from the top
every time its job runs; each step's result is stored in `jobd.job_steps` when it
completes, and a later run returns the stored result instead of running the step again.
The job's steps are loaded in one query the first time a run touches a step, so a
memoized step costs a dictionary lookup and a decode, no round trip.

Waiting frees the worker slot: `sleep`, `gather` and `wait_for_event` record what they
wait for, then raise `Suspend`, which ends the run. The worker turns it into an outcome
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

import inspect
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec
import trio

from actors import retry
from actors.ports import NewJob, Outcome
from protocol.durations import parse_duration

FINISHED = ("completed", "failed", "cancelled")
# Sleeps this short are slept in place: suspending costs more than it frees.
INLINE_SLEEP_S = 1.0
# A step's retry delay longer than this is left to the job's own retry (slot freed).
MAX_INLINE_RETRY_S = 30.0


class Suspend(BaseException):  # noqa: N818 - control flow, like trio.Cancelled
    """Ends this run of a handler; the job resumes later. A BaseException so that a
    handler's `except Exception` does not swallow it."""

    def __init__(self, state: str, delay_s: float | None, reason: str):
        super().__init__(reason)
        self.state = state  # "scheduled" (a sleep) | "waiting" (children, event)
        self.delay_s = delay_s
        self.reason = reason

    def outcome(self, job_id: int, token: int) -> Outcome:
        # refund=1: a suspension is not an attempt.
        return Outcome(id=job_id, token=token, state=self.state, delay_s=self.delay_s, refund=1)


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


class StepStore(Protocol):
    """What workflows need from the store (daemon.store.workflows implements it)."""

    async def load_steps(self, job_id: int) -> list[tuple[str, str | None, bool]]: ...
    async def save_step(self, job_id: int, name: str, result: str, attempts: int,
                        duration_s: float) -> str: ...
    async def save_step_error(self, job_id: int, name: str, error: str, attempts: int) -> None: ...
    async def begin_sleep(self, job_id: int, name: str, until: float) -> float: ...
    async def spawn_children(self, job_id: int, name: str, jobs: list[NewJob]) -> list[int]: ...
    async def gather_children(self, job_id: int, token: int, waiting_on: str,
                              ids: list[int]) -> list[dict[str, Any]]: ...
    async def begin_wait(self, job_id: int, token: int, step: str, event: str, match: str,
                         timeout_s: float | None) -> tuple[str, str | None, float]: ...
    async def get_job(self, job_id: int) -> dict[str, Any] | None: ...


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


class _Memo(msgspec.Struct):
    result: str | None
    done: bool


class WorkflowMixin:
    """The workflow half of `actors.handlers.Context` (which provides `job` and `_token`)."""

    job: Any
    _token: int

    def _init_workflow(self, steps: StepStore | None, wall: Callable[[], float] | None) -> None:
        self._steps_store = steps
        self._wall = wall or time.time
        self._memo: dict[str, _Memo] | None = None
        self._memo_lock: trio.Lock | None = None  # made by the first step that loads
        self._counters: dict[str, int] = {}
        self.step_stats = {"memoized": 0, "executed": 0}

    # -- plumbing -------------------------------------------------------------------------

    def _store(self) -> StepStore:
        if self._steps_store is None:
            raise RuntimeError("this Context has no step store (workflows need a daemon)")
        return self._steps_store

    async def _loaded(self) -> dict[str, _Memo]:
        if self._memo is None:
            if self._memo_lock is None:
                self._memo_lock = trio.Lock()
            async with self._memo_lock:
                if self._memo is None:
                    rows = await self._store().load_steps(self.job.id)
                    self._memo = {name: _Memo(result, done) for name, result, done in rows}
        return self._memo

    def _auto_name(self, prefix: str, name: str | None) -> str:
        if name is not None:
            return f"{prefix}:{name}"
        n = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = n
        return f"{prefix}#{n}"

    # -- steps ----------------------------------------------------------------------------

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retries: int = 2,
        backoff_s: float = 1.0,
        type: Any = Any,  # noqa: A002 - reads well at the call site: type=MyStruct
    ) -> Any:
        """Run `fn(*args)` once per job; later runs return its stored result.

        The result is msgspec-encoded; every run (the first one too) returns the value
        decoded from that encoding, so a resumed run sees exactly what an undisturbed
        one did. A failing call is retried in place up to `retries` times with
        exponential backoff; errors classified as non-retryable (actors/retry.py) and
        long delays go straight to the job's retry. A rate limit (HTTP 429, RateLimited)
        in a job with a key is not retried in place: it ends the run as the job's own
        rate-limit outcome, so the key is paused on every daemon and its adaptive rate
        slowed (the job resumes after the pause, its finished steps replayed). Without
        a key it is retried in place after its Retry-After.
        """
        memo = await self._loaded()
        entry = memo.get(name)
        if entry is not None and entry.done:
            self.step_stats["memoized"] += 1
            return _decode(entry.result, type)
        store = self._store()
        tries = 0
        started = time.perf_counter()
        while True:
            tries += 1
            try:
                value = fn(*args)
                if inspect.isawaitable(value):
                    value = await value
                break
            except Exception as exc:
                delay = _inline_retry_delay(exc, tries, retries, backoff_s,
                                            keyed=self.job.key is not None)
                if delay is None:
                    error = msgspec.json.encode({"class": retry.error_class(exc),
                                                 **retry.summarize(exc, limit=4)}).decode()
                    with trio.CancelScope(shield=True):
                        await store.save_step_error(self.job.id, name, error, tries)
                    raise
                await trio.sleep(delay)
        self.step_stats["executed"] += 1
        encoded = msgspec.json.encode(value).decode()
        stored = await store.save_step(self.job.id, name, encoded, tries,
                                       time.perf_counter() - started)
        memo[name] = _Memo(stored, True)
        return _decode(stored, type)

    # -- sleeps ---------------------------------------------------------------------------

    async def sleep(self, name: str, duration: str | float) -> None:
        """Sleep durably: the slot is freed and the handler resumes after `duration`
        (seconds or "10m"), across restarts. The wake-up time is fixed by the first call."""
        seconds = parse_duration(duration) if isinstance(duration, str) else float(duration)
        await self._sleep_step(f"sleep:{name}", lambda: self._wall() + seconds)

    async def sleep_until(self, name: str, when: datetime | float) -> None:
        until = when.timestamp() if isinstance(when, datetime) else float(when)
        await self._sleep_step(f"sleep:{name}", lambda: until)

    async def _sleep_step(self, key: str, until: Callable[[], float]) -> None:
        memo = await self._loaded()
        entry = memo.get(key)
        if entry is not None and entry.result is not None:
            wake = msgspec.json.decode(entry.result)["until"]
        else:
            wake = await self._store().begin_sleep(self.job.id, key, until())
            memo[key] = _Memo(msgspec.json.encode({"until": wake}).decode(), True)
        remaining = wake - self._wall()
        if remaining <= 0:
            return
        if remaining <= INLINE_SLEEP_S:
            await trio.sleep(remaining)
            return
        raise Suspend("scheduled", remaining, f"sleeping until {wake:.3f} ({key})")

    # -- children -------------------------------------------------------------------------

    async def spawn(self, kind: str, args: Any = None, *, name: str | None = None,
                    **options: Any) -> int:
        """Start one child job (see spawn_many); returns its id."""
        [child] = await self.spawn_many([Child(kind=kind, args=args or {}, **options)], name=name)
        return child

    async def spawn_many(self, children: Sequence[Child], *, name: str | None = None) -> list[int]:
        """Start child jobs; the children and the step recording their ids are written in
        one statement, so a re-run never starts them twice. Returns their ids."""
        key = self._auto_name("spawn", name)
        memo = await self._loaded()
        entry = memo.get(key)
        if entry is not None and entry.done:
            self.step_stats["memoized"] += 1
            return msgspec.json.decode(entry.result or "[]")
        rows = [_new_job(c, self.job) for c in children]
        ids = await self._store().spawn_children(self.job.id, key, rows)
        memo[key] = _Memo(msgspec.json.encode(ids).decode(), True)
        return ids

    async def gather(self, children: Sequence[int], *, name: str | None = None) -> list[ChildResult]:
        """Wait (slot freed, state `waiting`) until every child has finished; returns them
        in the order given. Failed and cancelled children are returned, not raised."""
        key = self._auto_name("gather", name)
        memo = await self._loaded()
        entry = memo.get(key)
        if entry is not None and entry.done:
            self.step_stats["memoized"] += 1
            return msgspec.json.decode(entry.result or "[]", type=list[ChildResult])
        ids = [int(c) for c in children]
        waiting_on = msgspec.json.encode({"type": "children", "ids": ids, "step": key}).decode()
        rows = await self._store().gather_children(self.job.id, self._token, waiting_on, ids)
        by_id = {r["id"]: r for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise LookupError(f"gather: no such child jobs {missing} (deleted?)")
        if any(by_id[i]["state"] not in FINISHED for i in ids):
            pending = sum(by_id[i]["state"] not in FINISHED for i in ids)
            raise Suspend("waiting", None, f"waiting for {pending} of {len(ids)} children")
        results = [
            ChildResult(id=i, kind=by_id[i]["kind"], state=by_id[i]["state"],
                        result=_maybe_json(by_id[i]["result"]),
                        error=None if by_id[i]["state"] == "completed"
                        else _maybe_json(by_id[i]["error"]))
            for i in ids
        ]
        stored = await self._store().save_step(
            self.job.id, key, msgspec.json.encode(results).decode(), 1, 0.0)
        memo[key] = _Memo(stored, True)
        return msgspec.json.decode(stored, type=list[ChildResult])

    # -- events ---------------------------------------------------------------------------

    async def wait_for_event(self, event: str, *, match: dict[str, Any] | None = None,
                             timeout: str | float | None = None, name: str | None = None,
                             type: Any = Any) -> Any:  # noqa: A002
        """Suspend until an event `event` whose data contains `match` is sent (after this
        wait began), or until `timeout` passes. Returns the event's data, or None on
        timeout. The human-approval step."""
        key = self._auto_name("event", name or event)
        memo = await self._loaded()
        entry = memo.get(key)
        if entry is not None and entry.done:
            self.step_stats["memoized"] += 1
            return _decode(entry.result, type)
        timeout_s = None if timeout is None else (
            parse_duration(timeout) if isinstance(timeout, str) else float(timeout))
        store = self._store()
        wait, data, now = await store.begin_wait(
            self.job.id, self._token, key, event, msgspec.json.encode(match or {}).decode(),
            timeout_s)
        deadline = msgspec.json.decode(wait).get("deadline")
        if data is None and (deadline is None or deadline > now):
            raise Suspend("waiting", None, f"waiting for event {event!r}")
        result = data if data is not None else "null"
        stored = await store.save_step(self.job.id, key, result, 1, 0.0)
        memo[key] = _Memo(stored, True)
        return _decode(stored, type)


# -- helpers -------------------------------------------------------------------------------


def _decode(raw: str | None, type_: Any) -> Any:
    if raw is None:
        return None
    return msgspec.json.decode(raw, type=type_)


def _maybe_json(raw: str | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


def _inline_retry_delay(exc: Exception, tries: int, retries: int, backoff_s: float,
                        keyed: bool = False) -> float | None:
    """Seconds to wait before retrying a step in place, or None to give up (raise)."""
    cls = retry.error_class(exc)
    if cls in ("validation", "client", "fail", "snooze") or tries > retries:
        return None
    if cls == "rate_limit" and keyed:
        return None  # the key's limiter must hear it: the job's outcome pauses the key
    delay = None
    if cls == "rate_limit":
        delay = retry.stated_pause(exc)
    if delay is None:
        delay = backoff_s * 2.0 ** (tries - 1) * random.uniform(0.75, 1.25)
    return delay if delay <= MAX_INLINE_RETRY_S else None


def _new_job(child: Child, parent: Any) -> NewJob:
    """A child row with its handler's defaults (args validated when the handler is known
    here; a kind served only by other daemons is passed through)."""
    from actors.errors import UnknownKind
    from actors.handlers import lookup

    args = child.args
    if isinstance(args, msgspec.Struct):
        args = msgspec.to_builtins(args)
    try:
        jobdef = lookup(child.kind)
    except UnknownKind:
        jobdef = None
    key = child.key
    if jobdef is not None:
        decoded = jobdef.decode_args(args)
        args = msgspec.to_builtins(decoded)
        if key is None and jobdef.key is not None:
            key = str(jobdef.key(decoded))
    row = NewJob(
        kind=child.kind,
        args=msgspec.json.encode(args).decode(),
        queue=child.queue or (jobdef.queue if jobdef else parent.queue),
        key=key,
        priority=child.priority if child.priority is not None else (
            jobdef.priority if jobdef else parent.priority),
        delay_s=child.delay_s,
        max_attempts=child.max_attempts or (jobdef.max_attempts if jobdef else 3),
        tags=child.tags,
        timeout_s=child.timeout_s if child.timeout_s is not None else (
            jobdef.timeout_s if jobdef else None),
    )
    from actors.validate import check_new_job

    check_new_job(row)  # a child out of range fails the parent's attempt, not the store
    return row



async def workflow_view(store: Any, view: Any) -> Any:
    """A JobView with the job's steps, children and wait (`jobctl get`); one round trip."""
    from protocol.workflows import ChildView, StepView, WorkflowView

    waiting_on, steps, children = await store.workflow_details(view.id)
    fields = {f: getattr(view, f) for f in view.__struct_fields__}
    return WorkflowView(
        **fields,
        steps=msgspec.json.decode(steps, type=list[StepView]),
        children=msgspec.json.decode(children, type=list[ChildView]),
        waiting_on=_maybe_json(waiting_on),
    )
