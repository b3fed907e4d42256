"""One attempt of one job: decode args, call the handler in its own cancel scope with
the job's timeout, and turn whatever happened into an Outcome for the completer."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from actors import retry
from actors.clock import Clock
from actors.control import new_job
from actors.errors import InvalidArgs, UnknownKind
from actors.handlers import Context, JobDef, JobInfo, lookup
from actors.ports import Claimed, Enqueued, NewJob, Outcome
from actors.workflow import Suspend, only_suspends
from protocol.jobs import JobSpec

log = logging.getLogger("jobd.worker")

# Why an attempt's scope was cancelled from outside (a timeout sets no reason).
CANCEL_REQUESTED = "cancel"
SHUTDOWN = "shutdown"


class Attempt:
    """Everything one attempt needs; `scope` and `reason` let the dispatcher stop it."""

    def __init__(self, claimed: Claimed):
        self.claimed = claimed
        self.scope = trio.CancelScope()
        self.reason: str | None = None

    def stop(self, reason: str) -> None:
        self.reason = reason
        self.scope.cancel()


class AttemptRunner:
    def __init__(
        self,
        *,
        clock: Clock,
        report_progress: Callable[[int, int, float | None, str | None], None],
        transaction: Callable[[], Any],
        default_timeout_s: float | None,
        progress_every_items: int,
        progress_every_s: float,
        snooze_burns_attempt: bool,
        rng: random.Random | None = None,
        steps: Any = None,
        enqueue_children: Callable[[int, list[NewJob]], Awaitable[list[Enqueued]]] | None = None,
    ):
        self._enqueue_children = enqueue_children
        self._clock = clock
        self._report_progress = report_progress
        self._transaction = transaction
        self._default_timeout_s = default_timeout_s
        self._every_items = progress_every_items
        self._every_s = progress_every_s
        self._snooze_burns = snooze_burns_attempt
        self._rng = rng or random.Random()
        self._steps = steps  # actors.workflow.StepStore, for ctx.step & co.

    async def run(self, attempt: Attempt) -> tuple[Outcome, str, float]:
        """Returns (outcome, label for metrics, run seconds)."""
        job = attempt.claimed
        started = self._clock.now()
        try:
            jobdef = lookup(job.kind)
            args = jobdef.decode_args(job.args)
        except (UnknownKind, InvalidArgs) as exc:
            cls = "validation" if isinstance(exc, InvalidArgs) else "unknown_kind"
            return self._fail(job, exc, cls, 0.0), "failed", 0.0
        ctx = self._context(job)
        timeout = job.timeout_s or jobdef.timeout_s or self._default_timeout_s
        with attempt.scope:
            if timeout:
                attempt.scope.deadline = started + timeout
            try:
                result = await jobdef.fn(ctx, args)
            except Suspend as suspend:  # a workflow waits: the slot is freed, no attempt burned
                return suspend.outcome(job.id, job.lease_token), "suspended", self._clock.now() - started
            except Exception as exc:  # noqa: BLE001 - every handler error is classified
                run_s = self._clock.now() - started
                return self._after_error(job, jobdef, exc, run_s), "error", run_s
            except BaseExceptionGroup as group:
                suspend = only_suspends(group)  # steps waiting inside a nursery
                if suspend is None:
                    raise
                return suspend.outcome(job.id, job.lease_token), "suspended", self._clock.now() - started
        run_s = self._clock.now() - started
        if attempt.scope.cancelled_caught:
            return self._after_cancel(job, attempt.reason, timeout, run_s)
        if ctx.completed_in_transaction:
            return (
                Outcome(id=job.id, token=job.lease_token, state="completed", flow="ok"),
                "committed",
                run_s,
            )
        try:
            encoded = msgspec.json.encode(result).decode()
        except (TypeError, msgspec.EncodeError) as exc:
            return self._fail(job, exc, "validation", run_s), "failed", run_s
        return (
            Outcome(id=job.id, token=job.lease_token, state="completed", result=encoded,
                    flow="ok"),
            "completed",
            run_s,
        )

    def _context(self, job: Claimed) -> Context:
        def info() -> JobInfo:
            return JobInfo(
                id=job.id, kind=job.kind, queue=job.queue, key=job.key, attempt=job.attempt,
                max_attempts=job.max_attempts, tags=list(job.tags), unique_key=job.unique_key,
                priority=job.priority, run_at=job.run_at, created_at=job.created_at,
                errors=msgspec.json.decode(job.errors),
            )

        enqueue = None
        if self._enqueue_children is not None:
            add = self._enqueue_children

            async def enqueue(specs: list[JobSpec]) -> list[Enqueued]:
                return await add(job.id, [new_job(spec) for spec in specs])

        return Context(
            info, job.lease_token, report_progress=self._report_progress,
            transaction=self._transaction, now=self._clock.now,
            progress_every_items=self._every_items, progress_every_s=self._every_s,
            enqueue=enqueue, steps=self._steps,
        )

    def _after_error(self, job: Claimed, jobdef: JobDef, exc: Exception, run_s: float) -> Outcome:
        decision = retry.decide(exc, job.attempt, job.max_attempts, self._rng, jobdef.base_delays)
        error = self._error(job, exc, decision.error_class, run_s)
        log.info(
            "job %s attempt %s raised %s: %s", job.id, job.attempt, type(exc).__name__, exc,
            extra={"event": "job.errored", "job_id": job.id, "queue": job.queue,
                   "kind": job.kind, "error_class": decision.error_class,
                   "action": decision.action},
        )
        flow, pause_s = _remote_signal(decision)
        if decision.action == "fail":
            return Outcome(id=job.id, token=job.lease_token, state="failed", error=error,
                           flow=flow)
        refund = 1 if decision.action == "snooze" and not self._snooze_burns else 0
        return Outcome(
            id=job.id, token=job.lease_token, state="scheduled" if decision.delay_s else "available",
            delay_s=decision.delay_s, error=error, refund=refund, flow=flow, pause_s=pause_s,
        )

    def _after_cancel(
        self, job: Claimed, reason: str | None, timeout: float | None, run_s: float
    ) -> tuple[Outcome, str, float]:
        token = job.lease_token
        if reason == CANCEL_REQUESTED:
            error = _encode({"attempt": job.attempt, "class": "cancelled",
                             "message": "cancelled while running", "duration_s": run_s})
            return Outcome(id=job.id, token=token, state="cancelled", error=error), "cancelled", run_s
        if reason == SHUTDOWN:
            # Interrupted by our own shutdown: not the job's fault, so the attempt is refunded.
            error = _encode({"attempt": job.attempt, "class": "interrupted",
                             "message": "daemon stopped before the attempt finished",
                             "duration_s": run_s})
            return (
                Outcome(id=job.id, token=token, state="available", delay_s=0.0, error=error, refund=1),
                "released",
                run_s,
            )
        decision = retry.timeout_decision(job.attempt, job.max_attempts, self._rng)
        error = _encode({"attempt": job.attempt, "class": "timeout",
                         "message": f"timed out after {timeout:g} s", "duration_s": run_s})
        state = "failed" if decision.action == "fail" else "scheduled"
        delay = None if decision.action == "fail" else decision.delay_s
        return (
            Outcome(id=job.id, token=token, state=state, delay_s=delay, error=error, flow="fail"),
            "timed_out",
            run_s,
        )

    def _fail(self, job: Claimed, exc: BaseException, cls: str, run_s: float) -> Outcome:
        return Outcome(id=job.id, token=job.lease_token, state="failed",
                       error=self._error(job, exc, cls, run_s))

    def _error(self, job: Claimed, exc: BaseException, cls: str, run_s: float) -> str:
        return _encode({"attempt": job.attempt, "at": self._clock.wall().isoformat(),
                        "class": cls, "duration_s": round(run_s, 6), **retry.summarize(exc)})


def _remote_signal(decision: retry.Decision) -> tuple[str | None, float | None]:
    """What an error says about the job's key: back-pressure, a failure, or nothing.

    A rate limit (HTTP 429, RateLimited) pauses the whole key on every daemon for the time
    the remote gave (None: the queue's rate_limit_pause) and slows its adaptive rate; a
    snooze (RetryAfter) concerns this job only; network-ish failures count toward the
    key's breaker; a job's own bad input (validation, 4xx, Fail) says nothing about the
    remote side.
    """
    if decision.error_class == "rate_limit":
        return "rate_limited", decision.pause_s
    if decision.error_class in ("network", "timeout", "unknown"):
        return "fail", None
    return None, None


def _encode(value: dict[str, Any]) -> str:
    return msgspec.json.encode(value).decode()
