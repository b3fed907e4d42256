"""The one way a new job row is built, whichever surface asks: an enqueue (socket, HTTP,
`ctx.enqueue`), a workflow's `ctx.spawn`, a schedule's occurrence.

Each takes the handler's declaration for what the caller left unset (queue, priority,
max_attempts, timeout) and applies its `key` and `cost` functions to the decoded args,
then checks the finished row (actors/validate.py). The surfaces differ only in what
they set and in the error they raise. The SQL `jobd.enqueue` function cannot see
handlers (it takes the caller's values, or the column defaults), nor can the direct
producer (daemon/producer.py) for a kind whose module the application has not
imported: it builds the row here with those same defaults (`from_spec(foreign=)`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from actors import tracing
from actors.errors import InvalidArgs, UnknownKind
from actors.handlers import Handlers
from actors.jobdef import JobDef
from actors.ports import NewJob
from actors.validate import check_new_job
from actors.workflow import Child
from protocol.errors import BadRequest, ErrorCode, JobdError
from protocol.jobs import DELAY_MAX_S, JobSpec


class Defaults(NamedTuple):
    """What a kind no handler here declares takes (a child served by other daemons)."""

    queue: str
    priority: int
    max_attempts: int = 3
    timeout_s: float | None = None


def build(
    handlers: Handlers,
    kind: str,
    args: Any,
    *,
    queue: str | None = None,
    key: str | None = None,
    unique_key: str | None = None,
    priority: int | None = None,
    delay_s: float | None = None,
    max_attempts: int | None = None,
    tags: list[str] | None = None,
    timeout_s: float | None = None,
    cost: int | None = None,
    foreign: Defaults | None = None,
    max_args_bytes: int | None = None,
    traceparent: str | None = None,
) -> NewJob:
    """A row for `kind`: None takes the handler's declaration.

    Raises UnknownKind (unless `foreign` gives the defaults of a kind declared
    elsewhere, whose args then go through as they are), InvalidArgs (the args, or the
    handler's key/cost function failing on them) and JobdError (a value out of range).
    """
    jobdef: JobDef | None = handlers.get(kind) if foreign is not None else handlers.lookup(kind)
    defaults: JobDef | Defaults
    if jobdef is None:
        assert foreign is not None
        defaults = foreign
        if isinstance(args, msgspec.Struct):
            args = msgspec.to_builtins(args)
        encoded = msgspec.json.encode(args)
    else:
        defaults = jobdef
        decoded = jobdef.decode_args(args)
        encoded = msgspec.json.encode(decoded)
        try:
            if key is None and jobdef.key is not None:
                key = jobdef.key_of(decoded)
            if cost is None and jobdef.cost is not None:
                cost = int(jobdef.cost(decoded))
        except Exception as exc:  # noqa: BLE001 - the handler's own function, on these args
            raise InvalidArgs(f"{kind}: the handler's key/cost function failed on these "
                              f"args: {exc!r}") from None
    row = NewJob(
        kind=kind,
        args=encoded.decode(),
        queue=queue or defaults.queue,
        key=key,
        unique_key=unique_key,
        priority=priority if priority is not None else defaults.priority,
        delay_s=delay_s,
        max_attempts=max_attempts if max_attempts is not None else defaults.max_attempts,
        tags=tags if tags is not None else [],
        timeout_s=timeout_s if timeout_s is not None else defaults.timeout_s,
        # A cost under 1 would make a job free against tokens_per_minute.
        cost=max(1, cost) if isinstance(cost, int) else (1 if cost is None else cost),
        traceparent=traceparent,
    )
    check_new_job(row, encoded, max_args_bytes)
    return row


def from_spec(handlers: Handlers, spec: JobSpec, *, max_args_bytes: int | None = None,
              foreign: Defaults | None = None, traceparent: str | None = None) -> NewJob:
    """An enqueue (socket, HTTP, `ctx.enqueue`, the direct producer): the edge, so every
    error is a JobdError with its code (unknown_kind, invalid_args, bad_request,
    too_large). With `foreign` a kind no handler here declares takes those defaults and
    only the generic value checks, as the direct producer does without the handler's
    module. `traceparent` is the one a spec without its own takes (an HTTP request's
    header, the enqueueing attempt's span)."""
    delay_s = spec.delay_s
    if spec.run_at is not None:
        run_at = spec.run_at if spec.run_at.tzinfo else spec.run_at.replace(tzinfo=UTC)
        delay_s = (run_at - datetime.now(UTC)).total_seconds()
        if delay_s > DELAY_MAX_S:
            raise BadRequest(f"run_at: at most {DELAY_MAX_S:g} s (ten years) from now, "
                             f"got {spec.run_at.isoformat()}",
                             details={"field": "run_at", "max_delay_s": DELAY_MAX_S})
    if isinstance(delay_s, int | float):
        delay_s = max(delay_s, 0.0)  # a time in the past means now
    if isinstance(spec.max_attempts, int) and spec.max_attempts < 1:
        raise BadRequest("max_attempts must be at least 1", details={"field": "max_attempts"})
    try:
        return build(
            handlers, spec.kind, spec.args, queue=spec.queue, key=spec.key,
            unique_key=spec.unique_key, priority=spec.priority, delay_s=delay_s,
            max_attempts=spec.max_attempts, tags=spec.tags, timeout_s=spec.timeout_s,
            cost=spec.cost, foreign=foreign, max_args_bytes=max_args_bytes,
            traceparent=spec.traceparent or traceparent,
        )
    except UnknownKind as exc:
        raise JobdError(str(exc), code=ErrorCode.UNKNOWN_KIND,
                        details={"kind": spec.kind}) from None
    except InvalidArgs as exc:
        details: dict[str, Any] = {"kind": spec.kind}
        if exc.field is not None:
            details["field"] = exc.field
        raise JobdError(str(exc), code=ErrorCode.INVALID_ARGS, details=details) from None


def child(handlers: Handlers, spec: Child, parent: Any) -> NewJob:
    """A workflow's child (`ctx.spawn`). A kind no handler here declares is passed through
    with the parent's queue and priority (another daemon serves it); a bad child raises
    out of the parent's attempt (InvalidArgs, JobdError), not in the store. With tracing
    on, the spawning attempt's span is the child's parent."""
    foreign = None if parent is None else Defaults(queue=parent.queue, priority=parent.priority)
    return build(
        handlers, spec.kind, spec.args, queue=spec.queue, key=spec.key, priority=spec.priority,
        delay_s=spec.delay_s, max_attempts=spec.max_attempts or None, tags=spec.tags,
        timeout_s=spec.timeout_s, foreign=foreign, traceparent=tracing.current_traceparent(),
    )
