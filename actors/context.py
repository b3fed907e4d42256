"""What a running handler sees: `Context` (its job as `JobInfo`, progress, heartbeats,
child enqueues, its SQL transaction) composed with the workflow part
(actors/workflow_context.py), which `ctx.step`, `ctx.sleep`, `ctx.spawn`, `ctx.gather`
and `ctx.wait_for_event` reach.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import msgspec
import trio

from actors.handlers import Handlers
from actors.ports import NewJob, Outcome, Transaction
from actors.workflow import Child, ChildResult
from actors.workflow_context import Workflow
from protocol.jobs import JobSpec


class JobInfo(msgspec.Struct, kw_only=True):
    """What a handler may know about its job (`ctx.job`)."""

    id: int
    kind: str
    queue: str
    key: str | None
    attempt: int
    max_attempts: int
    tags: list[str]
    unique_key: str | None
    priority: int
    run_at: datetime
    created_at: datetime
    errors: list[dict[str, Any]]

    @property
    def fire_at(self) -> datetime | None:
        """For a job a schedule fired: the occurrence it fired for (UTC), else None."""
        for tag in self.tags:
            if tag.startswith("fire:"):
                return datetime.fromisoformat(tag[5:])
        return None


class Context:
    """Handed to every handler call. Progress is throttled and written in batches;
    steps, sleeps, children and events are the `workflow` part's, built on first use.

    `handlers` is the registry this attempt's kind was found in (the failure-hook job
    looks the failed job's kind up there)."""

    def __init__(
        self,
        info: JobInfo | Callable[[], JobInfo],
        token: int,
        *,
        report_progress: Callable[[int, int, float | None, str | None], None],
        transaction: Callable[[], Any],
        now: Callable[[], float],
        progress_every_items: int,
        progress_every_s: float,
        enqueue: Callable[[list[JobSpec]], Awaitable[list[Any]]] | None = None,
        steps: Any = None,
        wall: Callable[[], float] | None = None,
        encode_result: Callable[[Any], str] | None = None,
        new_child: Callable[[Child, JobInfo], NewJob] | None = None,
        handlers: Handlers | None = None,
        claimed_steps: str | None = None,
    ):
        # Built on first use: most quick handlers never look, and a JobInfo per attempt
        # (tags copied, errors decoded) is measurable at thousands of jobs a second.
        self._job = info
        self._enqueue = enqueue
        self._token = token
        self._report = report_progress
        self._transaction = transaction
        self._now = now
        self._every_items = progress_every_items
        self._every_s = progress_every_s
        self._calls_since_write = 0
        self._last_write = -float("inf")
        self.completed_in_transaction = False
        self.result: Any = None
        # The worker's result check (NUL, lone surrogate, limits.max_result_bytes), for
        # tx.complete(result); raises actors.services.outcomes.InvalidValue.
        self._encode_result = encode_result or _encode_json
        self._in_thread = False  # a sync handler's: progress goes through trio.from_thread
        self._abandoned = False  # its attempt ended; the thread lives on, unheard
        self.handlers = handlers
        self._steps = steps
        self._wall = wall
        self._new_child = new_child
        self._workflow: Workflow | None = None
        self._claimed_steps = claimed_steps

    @property
    def lease_token(self) -> int:
        """This attempt's fencing token: a write that carries it lands only while the
        attempt still holds its job (the HTTP handler's callback token is derived from it)."""
        return self._token

    @property
    def job(self) -> JobInfo:
        if not isinstance(self._job, JobInfo):
            self._job = self._job()
        return self._job

    @property
    def workflow(self) -> Workflow:
        if self._workflow is None:
            self._workflow = Workflow(lambda: self.job, self._token, self._steps,
                                      wall=self._wall, new_child=self._new_child,
                                      claimed_steps=self._claimed_steps)
        return self._workflow

    # -- the workflow part's verbs, as the handler calls them (actors/workflow_context.py)

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 2,
                   backoff_s: float = 1.0, type: Any = Any) -> Any:  # noqa: A002
        """Run `fn(*args)` once per job; later runs return its stored result."""
        return await self.workflow.step(name, fn, *args, retries=retries,
                                        backoff_s=backoff_s, type=type)

    async def sleep(self, name: str, duration: str | float) -> None:
        """Sleep durably (the slot is freed); resumes after `duration`, across restarts."""
        await self.workflow.sleep(name, duration)

    async def sleep_until(self, name: str, when: datetime | float) -> None:
        await self.workflow.sleep_until(name, when)

    async def spawn(self, kind: str, args: Any = None, *, name: str | None = None,
                    **options: Any) -> int:
        """Start one child job; returns its id."""
        return await self.workflow.spawn(kind, args, name=name, **options)

    async def spawn_many(self, children: Sequence[Child], *, name: str | None = None
                         ) -> list[int]:
        """Start child jobs exactly once per job; returns their ids."""
        return await self.workflow.spawn_many(children, name=name)

    async def gather(self, children: Sequence[int], *, name: str | None = None
                     ) -> list[ChildResult]:
        """Wait (slot freed) until every child has finished; returns them in order."""
        return await self.workflow.gather(children, name=name)

    async def wait_for_event(self, event: str, *, match: dict[str, Any] | None = None,
                             timeout: str | float | None = None, name: str | None = None,
                             type: Any = Any) -> Any:  # noqa: A002
        """Suspend until a matching event is sent or `timeout` passes (then None)."""
        return await self.workflow.wait_for_event(event, match=match, timeout=timeout,
                                                  name=name, type=type)

    def progress(self, pct: float | None = None, note: str | None = None) -> bool:
        """Record progress; written at most every N calls or T seconds. True if written.

        TypeError/ValueError for a pct that is not a finite number or a note that is not
        a str; NUL and lone surrogates in the note are replaced (Postgres refuses them).
        Safe to call from a sync handler's thread.
        """
        if pct is not None:
            if isinstance(pct, bool) or not isinstance(pct, int | float):
                raise TypeError(f"progress pct must be a number or None, not {type(pct).__name__}")
            if not math.isfinite(pct):
                raise ValueError(f"progress pct must be finite, not {pct!r}")
        if note is not None:
            if not isinstance(note, str):
                raise TypeError(f"progress note must be a str or None, not {type(note).__name__}")
            note = clean_text(note)
        if self._in_thread:
            if self._abandoned:
                raise Abandoned("this attempt was cancelled or timed out; stop working")
            return trio.from_thread.run_sync(self._progress, pct, note)
        return self._progress(pct, note)

    def _progress(self, pct: float | None, note: str | None) -> bool:
        self._calls_since_write += 1
        now = self._now()
        due = (
            self._calls_since_write >= self._every_items
            or now - self._last_write >= self._every_s
        )
        if not due:
            return False
        self._calls_since_write = 0
        self._last_write = now
        pct = None if pct is None else max(0.0, min(100.0, float(pct)))
        self._report(self.job.id, self._token, pct, note)
        return True

    def heartbeat(self) -> None:
        """Renew the lease now (the daemon also renews leases on its own)."""
        if self._in_thread:
            if self._abandoned:
                raise Abandoned("this attempt was cancelled or timed out; stop working")
            trio.from_thread.run_sync(self._report, self.job.id, self._token, None, None)
            return
        self._report(self.job.id, self._token, None, None)

    async def enqueue_batch(self, jobs: list[JobSpec]) -> list[Any]:
        """Enqueue children of this job in one round trip; returns (id, created) per spec.

        A child's `unique_key` is taken by any retained job with that key, finished ones
        included, so a parent that runs again (a retry, a second trigger of the same
        day) creates each child once.
        """
        if self._enqueue is None:
            raise RuntimeError("this context cannot enqueue")
        return await self._enqueue(jobs)

    async def enqueue(self, kind: str, args: Any = None, **options: Any) -> Any:
        """One child; options as in JobSpec (unique_key, tags, queue, key, delay_s, ...)."""
        if isinstance(args, msgspec.Struct):
            args = msgspec.to_builtins(args)
        [done] = await self.enqueue_batch([JobSpec(kind=kind, args=args or {}, **options)])
        return done

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[HandlerSQL]:
        """SQL in one transaction on jobd's pool; `complete()` commits with your writes."""
        async with self._transaction() as tx:
            yield HandlerSQL(tx, self)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.transaction() as tx:
            return await tx.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.transaction() as tx:
            return await tx.fetch(sql, *args)


class Abandoned(BaseException):  # noqa: N818 - control flow, like trio.Cancelled
    """Raised in a sync handler's thread by ctx.progress/heartbeat once its attempt has
    ended (timeout, cancel, shutdown): a thread cannot be killed, but it can be told."""


def clean_text(text: str) -> str:
    """NUL and lone surrogates (which Postgres cannot store) replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def _encode_json(result: Any) -> str:
    return msgspec.json.encode(result).decode()


class HandlerSQL:
    def __init__(self, tx: Transaction, ctx: Context):
        self._tx = tx
        self._ctx = ctx
        self.execute = tx.execute
        self.fetch = tx.fetch
        self.fetchrow = tx.fetchrow
        self.fetchval = tx.fetchval

    async def complete(self, result: Any = None) -> None:
        """Finish the job in this transaction: both commit, or neither does.

        A result the worker would refuse (a NUL or lone surrogate, over
        limits.max_result_bytes) raises before anything is written; raised out of the
        handler, it rolls the transaction back and fails the attempt as invalid_value /
        result_too_large, as a returned result would.
        """
        encoded = self._ctx._encode_result(result)
        await self._tx.finish(
            Outcome(
                id=self._ctx.job.id,
                token=self._ctx._token,
                state="completed",
                result=encoded,
                flow="ok",
            )
        )
        self._ctx.completed_in_transaction = True
        self._ctx.result = result
