"""The workflow half of a handler's Context: steps memoized in `jobd.job_steps`, durable
sleeps, children, gathers and event waits (the model: actors/workflow.py).

A part the Context composes, not a mixin: it is given the job, the lease token, the
step store and the child builder, and reaches nothing else of its host.
"""

from __future__ import annotations

import inspect
import random
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import msgspec
import trio

from actors import retry, tracing
from actors.errors import Fail
from actors.ports import NewJob, StepStore
from actors.workflow import (
    FINISHED,
    INLINE_SLEEP_S,
    MAX_INLINE_RETRY_S,
    Child,
    ChildResult,
    Suspend,
    maybe_json,
)
from protocol.durations import parse_duration
from protocol.events import EVENT_NAME_PATTERN

_EVENT_NAME = re.compile(EVENT_NAME_PATTERN)


class _Memo(msgspec.Struct):
    result: str | None
    done: bool


# A step's result stays JSON text until a step asks for it with its type. A JSON null
# is a not-done step's missing result, or a done step's None: both decode to None.
_claimed_decoder = msgspec.json.Decoder(list[tuple[str, msgspec.Raw, bool]])


class Workflow:
    """One run's steps, sleeps, children and waits; `Context` hands these methods to the
    handler (`ctx.step`, ...). Built on first use, so a handler that never touches a
    step pays nothing for it.

    `job` returns the running job's JobInfo (built lazily by the Context); `new_child`
    turns a `Child` into the row to insert, with its handler's defaults (actors/jobs.py).
    """

    def __init__(
        self,
        job: Callable[[], Any],
        token: int,
        store: StepStore | None,
        *,
        wall: Callable[[], float] | None = None,
        new_child: Callable[[Child, Any], NewJob] | None = None,
        claimed_steps: str | None = None,
    ):
        """`claimed_steps`: the job's stored steps as its claim returned them (Claimed.steps),
        so a resumed run loads nothing; None: loaded on first use."""
        self._job = job
        self._claimed_steps = claimed_steps
        self._token = token
        self._steps_store = store
        self._wall = wall or time.time
        self._new_child = new_child
        self._memo: dict[str, _Memo] | None = None
        self._memo_lock: trio.Lock | None = None  # made by the first step that loads
        self._counters: dict[str, int] = {}
        self.step_stats = {"memoized": 0, "executed": 0}
        # Sleeps and waits begun in this run, not yet stored: the finish of this attempt
        # writes them (FINISH_MANY), in the completer's batch, fenced by the lease.
        self.pending: list[dict[str, Any]] = []
        self._spawned: set[int] = set()  # children this run inserted

    def pending_steps(self) -> str | None:
        """The `steps` of this attempt's Outcome: the sleeps and waits to record, "[]" for
        a job that has steps and nothing to record (its next claim returns them), None for
        a run that never touched a step."""
        if self.pending:
            return msgspec.json.encode(self.pending).decode()
        return "[]" if self._memo else None

    @property
    def job(self) -> Any:
        return self._job()

    # -- plumbing -------------------------------------------------------------------------

    @property
    def store(self) -> StepStore:
        """The step store; RuntimeError when there is none (a Context built by hand)."""
        if self._steps_store is None:
            raise RuntimeError("this Context has no step store (workflows need a daemon)")
        return self._steps_store

    async def _loaded(self) -> dict[str, _Memo]:
        if self._memo is None and self._claimed_steps is not None:
            # The steps came with the claim: decoded with no await, so no lock either.
            self._memo = {name: _Memo(None if raw == b"null" else bytes(raw).decode(), done)
                          for name, raw, done in _claimed_decoder.decode(self._claimed_steps)}
        if self._memo is None:
            if self._memo_lock is None:
                self._memo_lock = trio.Lock()
            async with self._memo_lock:
                if self._memo is None:
                    rows = await self.store.load_steps(self.job.id)
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
        # A span for a step that runs (with its in-place retries and its write), none for
        # a memoized one: a replay of 200 steps adds nothing to the trace. Tracing off,
        # not even the context manager (a step's cost is mostly such overheads).
        if not tracing.active():
            stored, _ = await self._run_step(name, fn, args, retries, backoff_s)
        else:
            with tracing.span(tracing.STEP_SPAN, {"jobd.step": name}) as span:
                stored, tries = await self._run_step(name, fn, args, retries, backoff_s)
                if span is not None:
                    span.set_attribute("jobd.step.tries", tries)
        memo[name] = _Memo(stored, True)
        return _decode(stored, type)

    async def _run_step(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...],
                        retries: int, backoff_s: float) -> tuple[str, int]:
        """Call `fn` (retrying in place) and store its result: (stored result, tries)."""
        store = self.store
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
        # Returns once the result is committed (with other workflows' steps: the step
        # writer's group commit); LeaseLost if this attempt no longer holds the job.
        stored = await store.save_step(self.job.id, self._token, name, encoded, tries,
                                       time.perf_counter() - started)
        return stored, tries

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
            # Stored by this attempt's finish: a crash before it loses only the sleep's
            # start (the re-run sleeps from then), never a step.
            wake = until()
            self.pending.append({"name": key, "until": wake})
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
        if self._new_child is None:
            raise RuntimeError("this Context cannot spawn (workflows need a daemon)")
        parent = self.job
        rows = [self._new_child(c, parent) for c in children]
        ids = await self.store.spawn_children(self.job.id, key, rows)
        memo[key] = _Memo(msgspec.json.encode(ids).decode(), True)
        self._spawned.update(ids)
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
        if ids and self._spawned.issuperset(ids):
            # Spawned by this very run: not worth a read. A child that finished meanwhile
            # is seen by the finish's trigger, which makes the job available at once.
            raise Suspend("waiting", None, f"waiting for {len(ids)} children", waiting_on)
        rows = await self.store.gather_children(self.job.id, self._token, waiting_on, ids)
        by_id = {r["id"]: r for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise LookupError(f"gather: no such child jobs {missing} (deleted?)")
        if any(by_id[i]["state"] not in FINISHED for i in ids):
            pending = sum(by_id[i]["state"] not in FINISHED for i in ids)
            raise Suspend("waiting", None, f"waiting for {pending} of {len(ids)} children",
                          waiting_on)
        results = [
            ChildResult(id=i, kind=by_id[i]["kind"], state=by_id[i]["state"],
                        result=maybe_json(by_id[i]["result"]),
                        error=None if by_id[i]["state"] == "completed"
                        else maybe_json(by_id[i]["error"]))
            for i in ids
        ]
        stored = await self.store.save_step(
            self.job.id, self._token, key, msgspec.json.encode(results).decode(), 1, 0.0)
        memo[key] = _Memo(stored, True)
        return msgspec.json.decode(stored, type=list[ChildResult])

    # -- events ---------------------------------------------------------------------------

    async def wait_for_event(self, event: str, *, match: dict[str, Any] | None = None,
                             timeout: str | float | None = None, name: str | None = None,
                             type: Any = Any) -> Any:  # noqa: A002
        """Suspend until an event `event` whose data contains `match` is sent (after this
        wait began), or until `timeout` passes. Returns the event's data, or None on
        timeout. The human-approval step."""
        if not isinstance(event, str) or not _EVENT_NAME.match(event):
            # No surface sends such a name (protocol/events.py), so the wait could only
            # time out: failing now says why.
            raise Fail(f"wait_for_event: {event!r} is not an event name that can be sent "
                       "(1 to 200 characters of A-Z a-z 0-9 _ . : / @ -)")
        key = self._auto_name("event", name or event)
        memo = await self._loaded()
        entry = memo.get(key)
        if entry is not None and entry.done:
            self.step_stats["memoized"] += 1
            return _decode(entry.result, type)
        timeout_s = None if timeout is None else (
            parse_duration(timeout) if isinstance(timeout, str) else float(timeout))
        if entry is None:
            # The finish that suspends the job stores the wait (FINISH_MANY): it began
            # when this attempt was claimed, and its deadline runs from the finish, both
            # on the database's clock. An event sent since the claim answers it.
            self.pending.append({"name": key, "wait": True, "timeout_s": timeout_s})
            waiting_on = msgspec.json.encode({
                "type": "event", "name": event, "match": match or {}, "step": key,
                "timeout_s": timeout_s}).decode()
            raise Suspend("waiting", None, f"waiting for event {event!r}", waiting_on)
        store = self.store
        wait, data, now = await store.begin_wait(
            self.job.id, self._token, key, event, msgspec.json.encode(match or {}).decode(),
            timeout_s)
        deadline = msgspec.json.decode(wait).get("deadline")
        if data is None and (deadline is None or deadline > now):
            raise Suspend("waiting", None, f"waiting for event {event!r}")
        result = data if data is not None else "null"
        stored = await store.save_step(self.job.id, self._token, key, result, 1, 0.0)
        memo[key] = _Memo(stored, True)
        return _decode(stored, type)


def _decode(raw: str | None, type_: Any) -> Any:
    if raw is None:
        return None
    return msgspec.json.decode(raw, type=type_)


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
