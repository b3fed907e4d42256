"""The handler registry: which kinds this process can run, and `@job`, which fills it.

A `Handlers` is an explicit object so that whoever needs the kinds (the dispatcher's
claim filter, enqueue validation, the worker, schedules, a reload) is handed the one
the daemon runs, and a test can build its own. `@job` registers into `HANDLERS`, the
instance a handler module fills when it is imported; the daemon runs that one.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from actors.errors import UnknownKind
from actors.events import cancels, triggers
from actors.jobdef import JobDef
from actors.tools import ToolKey, declare
from protocol.durations import parse_duration


class Handlers:
    """Kind -> JobDef. Reads and writes are single dict operations, so a reload's
    import thread may register while the loop looks kinds up."""

    def __init__(self) -> None:
        self._defs: dict[str, JobDef] = {}

    def job(
        self,
        kind: str,
        *,
        queue: str = "default",
        timeout: str | float | None = None,
        max_attempts: int = 3,
        priority: int = 0,
        key: Callable[[Any], str] | str | None = None,
        cost: Callable[[Any], int] | None = None,
        retry_delays: dict[str, float] | None = None,
        on_failure: Callable[..., Awaitable[Any]] | None = None,
        strict_args: bool = True,
        debounce: str | float | None = None,
        debounce_key: ToolKey = None,
        debounce_max: str | float | None = None,
        batch_size: int | None = None,
        batch_timeout: str | float | None = None,
        batch_key: ToolKey = None,
        throttle: str | float | None = None,
        throttle_key: ToolKey = None,
        throttle_burst: int | None = None,
        throttle_mode: str | None = None,
        singleton_key: ToolKey = None,
        singleton_mode: str | None = None,
        mode: str | None = None,
        unique_for: str | float | None = None,
        unique_mode: str | None = None,
        on_event: str | dict[str, Any] | list[str | dict[str, Any]] | None = None,
        cancel_on: dict[str, Any] | list[dict[str, Any]] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Declare a handler. Its second parameter's annotation is the args type (a Struct).

        An `async def` runs on the event loop; a plain `def` runs on a worker thread (for
        blocking SDKs), so it may block without stalling the daemon. `strict_args=False`
        accepts (and drops) args fields the type does not declare. `key` and `cost` are
        functions of the decoded args: the flow-control key, and the job's weight against
        the key's tokens_per_minute; every way of creating a job applies them. `key` may
        also be a path into the args ("marketplace", "user.id").

        `on_event` names the events that start this kind, each job's args the event's
        data: "name", {"event": "name", "match": {...}} (the data must contain the
        match), or a list of them. `cancel_on=[{"event": "name", "match": "field"}]`
        cancels this kind's unfinished jobs whose args equal the event's data on the
        field(s). A kind started by events needs a path `key` (or none): the jobs are
        created in SQL, where a Python function cannot run (actors/events.py).


        Flow-control tools (README "Flow-control tools", actors/tools.py): `debounce`
        (+ `debounce_key`, `debounce_max`), `batch_size` + `batch_timeout` (+ `batch_key`;
        the args type is then `list[Item]` and each enqueue is one Item), `throttle`
        (+ `throttle_key`, `throttle_burst`, mode delay|drop), `singleton_key` (mode
        skip|cancel), `unique_for` and `unique_mode="replace"`. A `*_key` is an args
        field name (SQL enqueues use it too) or a function of the decoded args.
        """
        started_by = triggers(kind, on_event)
        cancelled_by = cancels(kind, cancel_on)
        if started_by and key is not None and not isinstance(key, str):
            raise TypeError(f"{kind}: a kind started by events takes its key as a path into "
                            "the event's data (key=\"marketplace\"), not a function: the "
                            "jobs are created in SQL")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        timeout_s = None if timeout is None else parse_duration(timeout)

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
                raise TypeError(f"handler for {kind!r} must be a function, not a generator")
            params = list(inspect.signature(fn).parameters)
            if len(params) != 2:
                raise TypeError(f"handler for {kind!r} must take (ctx, args)")
            hints = typing.get_type_hints(fn)
            args_type = hints.get(params[1], dict[str, Any])
            tools = declare(
                kind, args_type, debounce=debounce, debounce_key=debounce_key,
                debounce_max=debounce_max, batch_size=batch_size, batch_timeout=batch_timeout,
                batch_key=batch_key, throttle=throttle, throttle_key=throttle_key,
                throttle_burst=throttle_burst, throttle_mode=throttle_mode,
                singleton_key=singleton_key, singleton_mode=singleton_mode, mode=mode,
                unique_for=unique_for, unique_mode=unique_mode)
            if started_by and tools is not None and tools.key_fns:
                raise TypeError(f"{kind}: a kind started by events takes its tool keys as args "
                                "field names (debounce_key=\"marketplace\"), not functions: "
                                "the jobs are created in SQL")
            self._defs[kind] = JobDef(
                kind=kind, fn=fn, args_type=args_type, queue=queue, tools=tools,
                declared_tools=tools, timeout_s=timeout_s, max_attempts=max_attempts, priority=priority, key=key,
                cost=cost, base_delays=dict(retry_delays or {}), on_failure=on_failure,
                sync=not inspect.iscoroutinefunction(fn), strict_args=strict_args,
                on_event=started_by, cancel_on=cancelled_by,
            )
            return fn

        return register

    def lookup(self, kind: str) -> JobDef:
        """The kind's JobDef; UnknownKind names the kinds there are."""
        try:
            return self._defs[kind]
        except KeyError:
            known = ", ".join(sorted(self._defs)) or "none"
            raise UnknownKind(f"unknown job kind {kind!r} (registered: {known})") from None

    def add(self, jobdef: JobDef) -> None:
        """Register a declaration built elsewhere (the HTTP kinds of the config)."""
        self._defs[jobdef.kind] = jobdef

    def discard(self, kind: str) -> None:
        self._defs.pop(kind, None)

    def get(self, kind: str) -> JobDef | None:
        return self._defs.get(kind)

    def kinds(self) -> list[str]:
        """The kinds, sorted (what the dispatcher claims)."""
        return sorted(self._defs)

    def registered(self) -> dict[str, JobDef]:
        """A snapshot, for restore() and for reading every declaration."""
        return dict(self._defs)

    def restore(self, snapshot: dict[str, JobDef]) -> None:
        """Put back a snapshot taken with registered() (a failed reload), with no moment
        at which a kind both have is missing; safe while another thread registers."""
        for kind, jobdef in snapshot.items():
            self._defs[kind] = jobdef
        for kind in [k for k in list(self._defs) if k not in snapshot]:
            self._defs.pop(kind, None)


HANDLERS = Handlers()
job = HANDLERS.job
