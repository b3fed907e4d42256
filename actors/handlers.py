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
import msgspec.inspect
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
    sync: bool = False  # a plain `def`: run on a worker thread (actors/services/worker.py)
    queue: str = "default"
    timeout_s: float | None = None
    max_attempts: int = 3
    priority: int = 0
    key: Callable[[Any], str] | None = None
    cost: Callable[[Any], int] | None = None
    base_delays: dict[str, float] = {}
    # async fn(ctx, args, last_error): runs once the job has failed (actors/failure_hooks.py)
    on_failure: Callable[..., Awaitable[Any]] | None = None
    # Unknown fields in args (a misspelling: {"secnds": 3}) are refused, not ignored.
    strict_args: bool = True

    def decode_args(self, raw: bytes | str | dict[str, Any] | msgspec.Struct) -> Any:
        """Args as the handler's type; InvalidArgs names the offending field.

        With `strict_args` a field the args type does not declare (at any depth of
        nested Structs) is refused too, as if every Struct forbade unknown fields.
        """
        try:
            if isinstance(raw, bytes | str):
                args = msgspec.json.decode(raw, type=self.args_type)
            else:
                if isinstance(raw, msgspec.Struct):
                    raw = msgspec.to_builtins(raw)
                args = msgspec.convert(raw, self.args_type)
            info = _struct_info(self.args_type) if self.strict_args else None
            if info is not None:
                plain = msgspec.json.decode(raw) if isinstance(raw, bytes | str) else raw
                unknown = _unknown_field(plain, info, "$")
                if unknown is not None:
                    path, name = unknown
                    raise InvalidArgs(
                        f"{self.kind}: Object contains unknown field `{name}` - at `{path}` "
                        "(the handler's args do not declare it; a handler may accept "
                        "unknown fields with @job(..., strict_args=False))",
                        field=f"{path}.{name}")
            return args
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidArgs(f"{self.kind}: {exc}") from exc


class _StructShape:
    """What the strict check knows of one Struct: its JSON field names, and for each the
    shape below it (None: nothing below can hold an unknown field)."""

    __slots__ = ("array_like", "fields", "tag_field")

    def __init__(self, tag_field: str | None, array_like: bool):
        self.tag_field = tag_field
        self.array_like = array_like
        self.fields: dict[str, Any] = {}


_SHAPES: dict[Any, Any] = {}


def _struct_info(args_type: Any) -> Any:
    """The args type compiled for the strict check, or None if no Struct is in it."""
    try:
        return _SHAPES[args_type]
    except (KeyError, TypeError):
        pass
    shape = _compile(msgspec.inspect.type_info(args_type), {})
    try:
        _SHAPES[args_type] = shape
    except TypeError:  # an unhashable annotation: compile each time
        pass
    return shape


def _compile(info: Any, memo: dict[Any, _StructShape]) -> Any:
    mi = msgspec.inspect
    if isinstance(info, mi.StructType):
        if info.cls in memo:  # a recursive Struct
            return memo[info.cls]
        shape = memo[info.cls] = _StructShape(info.tag_field, info.array_like)
        for field in info.fields:
            shape.fields[field.encode_name] = _compile(field.type, memo)
        return shape
    if isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        item = _compile(info.item_type, memo)
        return None if item is None else ("items", item)
    if isinstance(info, mi.TupleType):
        items = [_compile(t, memo) for t in info.item_types]
        return None if all(i is None for i in items) else ("tuple", items)
    if isinstance(info, mi.DictType):
        value = _compile(info.value_type, memo)
        return None if value is None else ("dict", value)
    if isinstance(info, mi.UnionType):
        structs = [t for t in info.types if isinstance(t, mi.StructType)]
        if any(isinstance(t, mi.DictType) for t in info.types):
            return None  # an object could be either: msgspec's own validation is all we have
        if len(structs) == 1:
            return _compile(structs[0], memo)
        if len(structs) > 1 and structs[0].tag_field is not None:
            return ("tagged", structs[0].tag_field,
                    {t.tag: _compile(t, memo) for t in structs})
    return None


def _unknown_field(value: Any, shape: Any, path: str) -> tuple[str, str] | None:
    """(path, name) of the first object key no Struct on the way declares."""
    if shape.__class__ is _StructShape:
        if shape.array_like or value.__class__ is not dict:
            return None
        fields = shape.fields
        for name, item in value.items():
            if name in fields:
                below = fields[name]
                if below is not None:
                    found = _unknown_field(item, below, f"{path}.{name}")
                    if found is not None:
                        return found
            elif name != shape.tag_field:
                return path, name
        return None
    kind = shape[0]
    if kind == "items" and value.__class__ is list:
        for i, item in enumerate(value):
            found = _unknown_field(item, shape[1], f"{path}[{i}]")
            if found is not None:
                return found
    elif kind == "tuple" and value.__class__ is list:
        for i, (item, below) in enumerate(zip(value, shape[1], strict=False)):
            if below is not None:
                found = _unknown_field(item, below, f"{path}[{i}]")
                if found is not None:
                    return found
    elif kind == "dict" and value.__class__ is dict:
        for name, item in value.items():
            found = _unknown_field(item, shape[1], f"{path}.{name}")
            if found is not None:
                return found
    elif kind == "tagged" and value.__class__ is dict:
        below = shape[2].get(value.get(shape[1]))
        if below is not None:
            return _unknown_field(value, below, path)
    return None


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
    strict_args: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a handler. Its second parameter's annotation is the args type (a Struct).

    An `async def` runs on the event loop; a plain `def` runs on a worker thread (for
    blocking SDKs), so it may block without stalling the daemon. `strict_args=False`
    accepts (and drops) args fields the type does not declare.
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
            sync=not inspect.iscoroutinefunction(fn), strict_args=strict_args,
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


def restore(snapshot: dict[str, JobDef]) -> None:
    """Put back a registry taken with registered() (a failed reload), with no moment at
    which a kind both have is missing; safe while another thread registers."""
    for kind, jobdef in snapshot.items():
        _REGISTRY[kind] = jobdef
    for kind in [k for k in list(_REGISTRY) if k not in snapshot]:
        _REGISTRY.pop(kind, None)


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
        encode_result: Callable[[Any], str] | None = None,
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
        # tx.complete(result); raises actors.worker.InvalidValue.
        self._encode_result = encode_result or _encode_json
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
