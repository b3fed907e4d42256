"""One attempt of one job: decode args, call the handler in its own cancel scope with
the job's timeout, and turn whatever happened into an Outcome for the completer."""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from actors import jobs, retry, tracing
from actors.context import Context, JobInfo
from actors.errors import AwaitCallback, InvalidArgs, UnknownKind
from actors.handlers import Handlers
from actors.jobdef import JobDef
from actors.ports import Claimed, Enqueued, NewJob, Outcome
from actors.runtime.clock import Clock
from actors.services.outcomes import (
    InvalidValue,
    encode_error,
    encode_result,
    remote_signal,
    summarize,
)
from actors.workflow import Suspend, only_suspends
from protocol.jobs import JobSpec

log = logging.getLogger("jobd.worker")

# Why an attempt's scope was cancelled from outside (a timeout sets no reason).
CANCEL_REQUESTED = "cancel"
SHUTDOWN = "shutdown"
# The lease is gone (rescued after a stall, reclaimed): this attempt's finish is fenced
# anyway, so it is stopped at once and its outcome is not written.
LEASE_LOST = "lease_lost"

# A timeout past this (about 31 years), or not a positive finite number, can only be a
# bad row (the edges refuse it): its attempt fails as invalid_value instead of crashing.
# The same bound holds for a retry delay a handler asks for (RetryAfter(inf)).
MAX_TIMEOUT_S = 1e9



class Attempt:
    """Everything one attempt needs; `scope` and `reason` let the dispatcher stop it.

    `limiter` bounds the threads of sync handlers (the queue's concurrency); `after` is an
    older attempt of the same job still running here, which must end before this starts.
    """

    def __init__(self, claimed: Claimed, limiter: trio.CapacityLimiter | None = None):
        self.claimed = claimed
        self.scope = trio.CancelScope()
        self.reason: str | None = None
        self.limiter = limiter
        self.after: Attempt | None = None
        self.done = trio.Event()

    @property
    def key(self) -> tuple[int, int]:
        return self.claimed.id, self.claimed.lease_token

    def stop(self, reason: str) -> None:
        self.reason = reason
        self.scope.cancel()


class AttemptRunner:
    """Runs attempts of the kinds in `handlers`; one runner serves every queue."""

    def __init__(
        self,
        *,
        handlers: Handlers,
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
        queue_timeout_s: Callable[[str], float | None] | None = None,
        max_result_bytes: int | None = None,
    ):
        self._handlers = handlers
        self._new_child = functools.partial(jobs.child, handlers)
        self._encode_result = functools.partial(encode_result, limit=max_result_bytes)
        self._enqueue_children = enqueue_children
        # timeout: the job's, else its kind's, else its queue's, else the global default.
        self._queue_timeout_s = queue_timeout_s
        self._max_result_bytes = max_result_bytes
        self._clock = clock
        self._report_progress = report_progress
        self._transaction = transaction
        self._default_timeout_s = default_timeout_s
        self._every_items = progress_every_items
        self._every_s = progress_every_s
        self._snooze_burns = snooze_burns_attempt
        self._rng = rng or random.Random()
        self._steps = steps  # actors.workflow.StepStore, for ctx.step & co.

    @property
    def handlers(self) -> Handlers:
        return self._handlers

    async def run(self, attempt: Attempt) -> tuple[Outcome, str, float]:
        """Returns (outcome, label for metrics, run seconds).

        Contains the attempt: whatever the handler raises (SystemExit, KeyboardInterrupt,
        a bare BaseException, a group holding one) becomes this attempt's outcome; only
        a cancellation that is not the attempt's own goes on up.
        """
        job = attempt.claimed
        started = self._clock.now()
        try:
            jobdef = self._handlers.lookup(job.kind)
            args = jobdef.decode_args(job.args)
        except (UnknownKind, InvalidArgs) as exc:
            cls = "validation" if isinstance(exc, InvalidArgs) else "unknown_kind"
            return self._fail(job, exc, cls, 0.0), "failed", 0.0
        timeout = (job.timeout_s or jobdef.timeout_s
                   or (self._queue_timeout_s(job.queue) if self._queue_timeout_s else None)
                   or self._default_timeout_s)
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:  # NaN fails both
            bad = ValueError(f"timeout_s {timeout!r} is not a usable timeout "
                             f"(0 < timeout_s <= {MAX_TIMEOUT_S:g} s)")
            return self._fail(job, bad, "invalid_value", 0.0), "error", 0.0
        ctx = self._context(job)
        outcome, label, run_s = await self._run_handler(attempt, jobdef, args, ctx, timeout,
                                                       started)
        workflow = ctx._workflow
        if workflow is not None:
            # The sleeps and waits this run began are written with its finish, which also
            # marks the job as having steps (its next claim returns them).
            steps = workflow.pending_steps()
            if steps is not None:
                outcome = msgspec.structs.replace(outcome, steps=steps)
        return outcome, label, run_s

    async def _run_handler(self, attempt: Attempt, jobdef: JobDef, args: Any, ctx: Context,
                           timeout: float | None, started: float) -> tuple[Outcome, str, float]:
        job = attempt.claimed
        with attempt.scope:
            if timeout:
                attempt.scope.deadline = started + timeout
            try:
                if jobdef.sync:
                    # On a worker thread: the loop goes on. A timeout or cancel abandons
                    # the thread (it cannot be killed); its result is then discarded.
                    ctx._in_thread = True
                    try:
                        result = await trio.to_thread.run_sync(
                            jobdef.fn, ctx, args, abandon_on_cancel=True,
                            limiter=attempt.limiter)
                    finally:
                        ctx._abandoned = True
                else:
                    result = await jobdef.fn(ctx, args)
            except Suspend as suspend:  # a workflow waits: the slot is freed, no attempt burned
                return suspend.outcome(job.id, job.lease_token), "suspended", self._clock.now() - started
            except AwaitCallback as wait:  # the app finishes it (actors/http_handler.py)
                # Still `running` (its key's slot held), on no daemon's lease: the
                # finish detaches it and the reaper times it out at the deadline.
                return (Outcome(id=job.id, token=job.lease_token, state="running",
                                delay_s=wait.timeout_s),
                        "detached", self._clock.now() - started)
            except InvalidValue as exc:  # tx.complete(result) refused the result
                run_s = self._clock.now() - started
                return self._fail(job, exc, exc.error_class, run_s), "error", run_s
            except Exception as exc:  # noqa: BLE001 - every handler error is classified
                run_s = self._clock.now() - started
                return self._after_error(job, jobdef, exc, run_s), "error", run_s
            except BaseExceptionGroup as group:
                waiting = only_suspends(group)  # steps waiting in a nursery
                if waiting is not None:
                    return waiting.outcome(job.id, job.lease_token), "suspended", self._clock.now() - started
                _, crash = group.split(trio.Cancelled)
                if crash is None:
                    raise  # only cancellations: the scope they belong to takes them
                run_s = self._clock.now() - started
                return self.crashed(job, crash, run_s), "error", run_s
            except trio.Cancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit & co. end this attempt only
                run_s = self._clock.now() - started
                return self.crashed(job, exc, run_s), "error", run_s
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
            encoded = self._encode_result(result)
        except InvalidValue as exc:
            return self._fail(job, exc, exc.error_class, run_s), "error", run_s
        except (TypeError, msgspec.EncodeError) as exc:
            return self._fail(job, exc, "validation", run_s), "failed", run_s
        return (
            Outcome(id=job.id, token=job.lease_token, state="completed", result=encoded,
                    flow="ok"),
            "completed",
            run_s,
        )

    def crashed(self, job: Claimed, exc: BaseException, run_s: float) -> Outcome:
        """A handler raised something no handler should (SystemExit, KeyboardInterrupt, a
        bare BaseException): fail the attempt as `crashed`, the daemon goes on.

        It retries per max_attempts like an unknown error (a library's sys.exit on a lost
        connection is transient), so a poison job runs at most max_attempts times.
        """
        log.warning(
            "job %s attempt %s crashed with %s", job.id, job.attempt, type(exc).__name__,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"event": "job.crashed", "job_id": job.id, "queue": job.queue,
                   "kind": job.kind, "error_class": "crashed"},
        )
        error = self._error(job, exc, "crashed", run_s)
        if job.attempt >= job.max_attempts:
            return Outcome(id=job.id, token=job.lease_token, state="failed", error=error)
        delay = retry.backoff("crashed", job.attempt, self._rng)
        return Outcome(id=job.id, token=job.lease_token, state="scheduled", delay_s=delay,
                       error=error)

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
            add, handlers = self._enqueue_children, self._handlers

            async def enqueue(specs: list[JobSpec]) -> list[Enqueued]:
                traceparent = tracing.current_traceparent()  # the attempt's span: the parent
                return await add(job.id, [jobs.from_spec(handlers, spec, traceparent=traceparent)
                                          for spec in specs])

        return Context(
            info, job.lease_token, report_progress=self._report_progress,
            transaction=self._transaction, now=self._clock.now,
            progress_every_items=self._every_items, progress_every_s=self._every_s,
            enqueue=enqueue, steps=self._steps,
            encode_result=self._encode_result, new_child=self._new_child,
            handlers=self._handlers, claimed_steps=job.steps,
        )

    def _after_error(self, job: Claimed, jobdef: JobDef, exc: Exception, run_s: float) -> Outcome:
        decision = retry.decide(exc, job.attempt, job.max_attempts, self._rng, jobdef.base_delays)
        if not 0 <= decision.delay_s <= MAX_TIMEOUT_S:  # RetryAfter(inf) or NaN: no such time
            bad = ValueError(f"{type(exc).__name__} asked for a delay of {decision.delay_s!r} s, "
                             f"not a usable delay (0 <= delay <= {MAX_TIMEOUT_S:g} s)")
            return self._fail(job, bad, "invalid_value", run_s)
        error = self._error(job, exc, decision.error_class, run_s)
        log.info(
            "job %s attempt %s raised %s: %s", job.id, job.attempt, type(exc).__name__, exc,
            extra={"event": "job.errored", "job_id": job.id, "queue": job.queue,
                   "kind": job.kind, "error_class": decision.error_class,
                   "action": decision.action},
        )
        flow, pause_s = remote_signal(decision)
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
            error = encode_error({"attempt": job.attempt, "class": "cancelled",
                             "message": "cancelled while running", "duration_s": run_s})
            return Outcome(id=job.id, token=token, state="cancelled", error=error), "cancelled", run_s
        if reason == SHUTDOWN:
            # Interrupted by our own shutdown: not the job's fault, so the attempt is refunded.
            error = encode_error({"attempt": job.attempt, "class": "interrupted",
                             "message": "daemon stopped before the attempt finished",
                             "duration_s": run_s})
            return (
                Outcome(id=job.id, token=token, state="available", delay_s=0.0, error=error, refund=1),
                "released",
                run_s,
            )
        if reason == LEASE_LOST:
            # Not written (the dispatcher drops it): the job belongs to its next attempt.
            error = encode_error({"attempt": job.attempt, "class": "lease_lost",
                             "message": "lease lost while running", "duration_s": run_s})
            return Outcome(id=job.id, token=token, state="available", error=error), "lease_lost", run_s
        decision = retry.timeout_decision(job.attempt, job.max_attempts, self._rng)
        error = encode_error({"attempt": job.attempt, "class": "timeout",
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
        return encode_error({"attempt": job.attempt, "at": self._clock.wall().isoformat(),
                        "class": cls, "duration_s": round(run_s, 6), **summarize(exc)})
