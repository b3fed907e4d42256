"""The handler API: `@job` declares a kind, `Context` is what a running handler sees."""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import msgspec
import trio

from actors.errors import InvalidArgs, UnknownKind
from actors.ports import Outcome, Transaction
from actors.workflow import WorkflowMixin
from protocol.durations import parse_duration
from protocol.jobs import JobSpec


def seconds(value: str | float | int | None) -> float | None:
    return None if value is None else parse_duration(value)


class JobDef(msgspec.Struct, kw_only=True):
    kind: str
    fn: Callable[..., Any]
    args_type: Any
    sync: bool = False  # a plain `def`: run on a worker thread (actors/worker.py)
    queue: str = "default"
    timeout_s: float | None = None
    max_attempts: int = 3
    priority: int = 0
    key: Callable[[Any], str] | None = None
    cost: Callable[[Any], int] | None = None
    base_delays: dict[str, float] = {}
    # async fn(ctx, args, last_error): runs once the job has failed (actors/failure_hooks.py)
    on_failure: Callable[..., Awaitable[Any]] | None = None

    def decode_args(self, raw: bytes | str | dict[str, Any] | msgspec.Struct) -> Any:
        """Args as the handler's type; InvalidArgs names the offending field."""
        try:
            if isinstance(raw, bytes | str):
                return msgspec.json.decode(raw, type=self.args_type)
            if isinstance(raw, msgspec.Struct):
                raw = msgspec.to_builtins(raw)
            return msgspec.convert(raw, self.args_type)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidArgs(f"{self.kind}: {exc}") from exc


_REGISTRY: dict[str, JobDef] = {}


def job(
    kind: str,
    *,
    queue: str = "default",
    timeout: str | float | None = None,
    max_attempts: int = 3,
    priority: int = 0,
    key: Callable[[Any], str] | None = None,
    cost: Callable[[Any], int] | None = None,
    retry_delays: dict[str, float] | None = None,
    on_failure: Callable[..., Awaitable[Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a handler. Its second parameter's annotation is the args type (a Struct).

    An `async def` runs on the event loop; a plain `def` runs on a worker thread (for
    blocking SDKs), so it may block without stalling the daemon.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    timeout_s = seconds(timeout)

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(f"handler for {kind!r} must be a function, not a generator")
        params = list(inspect.signature(fn).parameters)
        if len(params) != 2:
            raise TypeError(f"handler for {kind!r} must take (ctx, args)")
        hints = typing.get_type_hints(fn)
        _REGISTRY[kind] = JobDef(
            kind=kind, fn=fn, args_type=hints.get(params[1], dict[str, Any]), queue=queue,
            timeout_s=timeout_s, max_attempts=max_attempts, priority=priority, key=key, cost=cost,
            base_delays=dict(retry_delays or {}), on_failure=on_failure,
            sync=not inspect.iscoroutinefunction(fn),
        )
        return fn

    return register


def lookup(kind: str) -> JobDef:
    try:
        return _REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownKind(f"unknown job kind {kind!r} (registered: {known})") from None


def registered() -> dict[str, JobDef]:
    return dict(_REGISTRY)


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


class Context(WorkflowMixin):
    """Handed to every handler call. Progress is throttled and written in batches;
    steps, sleeps, children and events come from WorkflowMixin (actors/workflow.py)."""

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
        self._in_thread = False  # a sync handler's: progress goes through trio.from_thread
        self._abandoned = False  # its attempt ended; the thread lives on, unheard
        self._init_workflow(steps, wall)

    @property
    def job(self) -> JobInfo:
        if not isinstance(self._job, JobInfo):
            self._job = self._job()
        return self._job

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


class HandlerSQL:
    def __init__(self, tx: Transaction, ctx: Context):
        self._tx = tx
        self._ctx = ctx
        self.execute = tx.execute
        self.fetch = tx.fetch
        self.fetchrow = tx.fetchrow
        self.fetchval = tx.fetchval

    async def complete(self, result: Any = None) -> None:
        """Finish the job in this transaction: both commit, or neither does."""
        await self._tx.finish(
            Outcome(
                id=self._ctx.job.id,
                token=self._ctx._token,
                state="completed",
                result=msgspec.json.encode(result).decode(),
                flow="ok",
            )
        )
        self._ctx.completed_in_transaction = True
        self._ctx.result = result
