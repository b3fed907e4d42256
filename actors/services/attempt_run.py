"""One claimed attempt from start to hand-over: run it, count it, give its outcome to
the completer.

The dispatcher's workers call this for each attempt they take; the bookkeeping of
which attempts hold a slot stays in the dispatcher. A bug around one attempt (not in
the handler: the runner contains those) fails that attempt only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from actors import tracing
from actors.handlers import Handlers
from actors.ports import Observer, Outcome
from actors.runtime import lag
from actors.services.outcomes import error_class
from actors.services.worker import Attempt, AttemptRunner

log = logging.getLogger("jobd.dispatcher")


async def run_and_hand_over(
    attempt: Attempt,
    runner: AttemptRunner,
    observer: Observer,
    hand_over: Callable[[Outcome], Awaitable[None]],
    hand_over_nowait: Callable[[Outcome], None],
) -> None:
    """`hand_over_nowait` raises trio.WouldBlock when the completer is full; then
    `hand_over` waits, and that wait is the pool's backpressure."""
    job = attempt.claimed
    task = trio.lowlevel.current_task()
    wait_s = max(0.0, (job.started_at - job.run_at).total_seconds())
    observer.job_started(job.queue, job.kind, wait_s)
    if job.attempt == 1 and job.args.startswith('{"items":'):
        size = batch_size(runner.handlers, job)
        if size is not None:
            observer.batch_started(job.kind, size)
    lag.attempt_started(task, job.kind, job.id)  # named if it blocks the loop
    traced = tracing.start_attempt(job, wait_s)  # None, and nothing built, when off
    try:
        outcome, label, run_s = await runner.run(attempt)
    except trio.Cancelled:
        if traced is not None:
            traced.end(None, "interrupted")
            traced = None
        raise
    except BaseException as exc:  # noqa: BLE001 - a bug around one attempt fails that attempt
        outcome, label, run_s = _crashed(runner, job, exc), "error", 0.0
    finally:
        lag.attempt_ended(task)
    if traced is not None:
        outcome = traced.end(outcome, _span_outcome(outcome, label)) or outcome
    if label == "lease_lost":
        # The job is another attempt's now; a finish would be fenced, so none is sent.
        observer.job_finished(job.queue, job.kind, label, run_s)
        return
    if outcome.error is not None and label in ("error", "failed", "timed_out"):
        observer.error_classified(job.queue, error_class(outcome.error))
    if outcome.flow == "rate_limited" and job.key is not None:  # stated pause or the default
        observer.key_paused(job.queue, job.key)
    try:
        hand_over_nowait(outcome)
    except trio.WouldBlock:
        await hand_over(outcome)
    observer.job_finished(job.queue, job.kind, _metric_outcome(outcome, label), run_s)


def batch_size(handlers: Handlers, job: Any) -> int | None:
    """Items in a batch kind's job (args {"items": [...]}, sealed by its claim)."""
    jobdef = handlers.get(job.kind)
    if jobdef is None or not jobdef.batched:
        return None
    try:
        items = msgspec.json.decode(job.args).get("items")
    except (msgspec.DecodeError, AttributeError):
        return None
    return len(items) if isinstance(items, list) else None


def _crashed(runner: AttemptRunner, job: Any, exc: BaseException) -> Outcome:
    try:
        return runner.crashed(job, exc, 0.0)
    except Exception:  # noqa: BLE001 - even the error could not be built: keep a plain one
        log.exception("job %s: could not record its crash", job.id,
                      extra={"event": "job.crashed", "job_id": job.id})
        error = msgspec.json.encode({"attempt": job.attempt, "class": "crashed",
                                     "message": type(exc).__name__}).decode()
        return Outcome(id=job.id, token=job.lease_token, state="failed", error=error)


# What a span can tell that the metric's outcome folds away.
_SPAN_OUTCOMES = {"suspended": "suspended", "lease_lost": "lease_lost", "committed": "completed"}


def _span_outcome(outcome: Outcome, label: str) -> str:
    return _SPAN_OUTCOMES.get(label) or _metric_outcome(outcome, label)


def _metric_outcome(outcome: Outcome, label: str) -> str:
    if label in ("timed_out", "released", "detached"):
        return label
    if outcome.state in ("completed", "failed", "cancelled"):
        return outcome.state
    return "retried"
