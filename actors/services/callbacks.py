"""The control plane's side of an HTTP handler's callbacks (protocol/callbacks.py):
check the token, then finish the attempt or renew its deadline.

Any daemon can take a callback, not only the one that made the call: the token is
checked against the kind's signing keys from the config (actors/http_handler.py) and
the attempt's lease token read from Postgres, and every write is fenced by that lease
token, so a callback for an attempt that was timed out, cancelled or retried since
changes nothing. A complete or fail is an ordinary finish (FINISH_MANY): the key's
flow effects, failure hooks and the rest apply as to a local attempt.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

from actors import retry
from actors.errors import Fail
from actors.http_handler import HttpCalls, token_matches
from actors.ports import NullObserver, Observer, Outcome, Store
from actors.services.outcomes import (
    InvalidValue,
    encode_error,
    encode_result,
    error_class,
    remote_signal,
)
from protocol.callbacks import CallbackResult, JobComplete, JobFail, JobHeartbeat, JobProgress
from protocol.errors import ErrorCode, JobdError, NotFound

Callback = JobComplete | JobFail | JobProgress | JobHeartbeat


class RemoteFailure(Exception):
    """The app said the attempt failed and may be retried: classed `unknown`."""


class Callbacks:
    def __init__(self, store: Store, calls: HttpCalls, *, max_result_bytes: int | None,
                 observer: Observer | None = None, rng: random.Random | None = None):
        self._store = store
        self._observer: Observer = observer or NullObserver()
        self._calls = calls
        self._max_result_bytes = max_result_bytes
        self._rng = rng or random.Random()

    async def handle(self, cmd: Callback) -> CallbackResult:
        job = await self._store.callback_target(cmd.job_id)
        # One answer for "no such job" and "wrong token": a caller without the token
        # learns nothing about which jobs exist.
        endpoint = self._calls.endpoint(job["kind"]) if job is not None else None
        if job is None or endpoint is None or not token_matches(
                endpoint, job["id"], job["lease_token"], cmd.token):
            raise JobdError(f"job {cmd.job_id}: no HTTP attempt with this callback token "
                            "(a wrong token, or the attempt has ended)",
                            code=ErrorCode.UNAUTHORIZED, details={"id": cmd.job_id})
        if job["state"] != "running":
            raise _ended(cmd.job_id, job["state"])
        if isinstance(cmd, JobProgress | JobHeartbeat):
            pct, note = (cmd.pct, cmd.note) if isinstance(cmd, JobProgress) else (None, None)
            renewed = await self._store.renew_callback(
                cmd.job_id, job["lease_token"], pct, note, endpoint.callback_timeout_s)
            if renewed is None:
                raise await self._now_ended(cmd.job_id)
            return CallbackResult(id=cmd.job_id, state="running",
                                  deadline=renewed["lease_until"] if renewed["detached"] else None)
        outcome = self._outcome(cmd, job)
        if cmd.job_id not in await self._store.finish_many([outcome]):
            raise await self._now_ended(cmd.job_id)
        # Counted where it finished, as a local attempt is (its run time from its start).
        if outcome.error is not None:
            self._observer.error_classified(job["queue"], error_class(outcome.error))
        finished = outcome.state if outcome.state in ("completed", "failed") else "retried"
        self._observer.job_finished(job["queue"], job["kind"], finished,
                                    float(job["running_s"] or 0.0))
        return CallbackResult(id=cmd.job_id, state=outcome.state)

    def _outcome(self, cmd: JobComplete | JobFail, job: dict[str, Any]) -> Outcome:
        token, attempt = job["lease_token"], job["attempt"]
        if isinstance(cmd, JobComplete):
            try:
                result = encode_result(cmd.result, self._max_result_bytes)
            except InvalidValue as exc:
                return Outcome(id=job["id"], token=token, state="failed",
                               error=self._error(attempt, exc.error_class, str(exc)))
            return Outcome(id=job["id"], token=token, state="completed", result=result,
                           flow="ok")
        failure: Exception = RemoteFailure(cmd.message) if cmd.retryable else Fail(cmd.message)
        decision = retry.decide(failure, attempt, job["max_attempts"], self._rng)
        flow, _ = remote_signal(decision)
        error = self._error(attempt, decision.error_class, cmd.message)
        if decision.action == "fail":
            return Outcome(id=job["id"], token=token, state="failed", error=error, flow=flow)
        return Outcome(id=job["id"], token=token, state="scheduled", delay_s=decision.delay_s,
                       error=error, flow=flow)

    @staticmethod
    def _error(attempt: int, cls: str, message: str) -> str:
        return encode_error({"attempt": attempt, "at": datetime.now(UTC).isoformat(),
                             "class": cls, "message": f"callback: {message}"})

    async def _now_ended(self, job_id: int) -> JobdError:
        """The fenced write matched nothing: the attempt ended meanwhile (a timeout, a
        cancel, another callback)."""
        job = await self._store.callback_target(job_id)
        if job is None:
            return NotFound(f"no job {job_id}", details={"id": job_id})
        return _ended(job_id, job["state"] if job["state"] != "running" else "retried")


def _ended(job_id: int, state: str) -> JobdError:
    return JobdError(f"job {job_id}: the attempt has ended (the job is {state})",
                     code=ErrorCode.CONFLICT, details={"id": job_id, "state": state})
