"""Kinds whose handler is a URL: one generic handler that POSTs the job to its endpoint
and maps the answer onto the retry table (README "Handlers behind a URL").

An HTTP kind is an ordinary JobDef in the Handlers registry (args a JSON object, its
`key` a field or JSON pointer of them), so enqueue, schedules, flow control, retries,
cancel, list and get treat it like any other kind. Only the attempt differs:

| the endpoint answers                  | the attempt                                          |
|---------------------------------------|------------------------------------------------------|
| 2xx                                   | completed, the JSON body its result (empty: null)    |
| 202 `{"callback": true}`              | detached: `running`, the key's slot held, until the  |
|                                       | app calls back or `callback_timeout` passes          |
| 429                                   | RateLimited(Retry-After): the key pauses everywhere  |
| 408, 5xx, timeout, connection error   | network: retried with backoff                        |
| any other 4xx                         | Fail: failed now                                     |
| a body over limits.max_result_bytes   | result_too_large                                     |

The callback token is not stored: it is an HMAC, under the kind's signing key, of the
job id and the attempt's lease token, so any daemon with the same config can check it,
it is valid from the moment the request leaves (an app may call back before jobd has
read its 202), and it dies with the attempt (a new attempt has a new lease token).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import trio

from actors import tracing
from actors.context import Context
from actors.errors import AwaitCallback, Fail, RateLimited
from actors.handlers import Handlers
from actors.jobdef import JobDef
from actors.ports import Observer
from actors.services.outbound import DestinationRefused, Outbound
from actors.services.outcomes import InvalidValue
from protocol.webhook_signing import sign_headers

log = logging.getLogger("jobd.http_handler")

_ERROR_FIELDS = ("attempt", "at", "class", "message")
_SNIPPET = 300  # characters of a refused answer's body kept in the job's error


class Endpoint:
    """One `[http.kinds.<kind>]`, prepared: where to POST, the keys that sign, how long
    to wait. The keys never leave this object (its repr leaves them out)."""

    __slots__ = ("callback_timeout_s", "kind", "signing_keys", "timeout_s", "url")

    def __init__(self, kind: str, url: str, signing_keys: list[bytes], timeout_s: float,
                 callback_timeout_s: float):
        if not signing_keys:
            raise ValueError(f"{kind}: an HTTP kind needs a signing key")
        self.kind = kind
        self.url = url
        self.signing_keys = signing_keys
        self.timeout_s = timeout_s
        self.callback_timeout_s = callback_timeout_s

    def __repr__(self) -> str:
        return f"Endpoint({self.kind!r}, {self.url!r})"


class HttpKind(msgspec.Struct, kw_only=True):
    """What the daemon's config makes of one HTTP kind, ready to register."""

    endpoint: Endpoint
    queue: str = "default"
    max_attempts: int = 3
    priority: int = 0
    key: Callable[[Any], str] | None = None
    check_args: Callable[[Any], None] | None = None


def callback_token(key: bytes, job_id: int, lease_token: int) -> str:
    mac = hmac.new(key, f"jobd-callback.{job_id}.{lease_token}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def token_matches(endpoint: Endpoint, job_id: int, lease_token: int, given: str) -> bool:
    """Any of the kind's keys (a rotation signs with old and new) may have minted it."""
    return any(hmac.compare_digest(callback_token(k, job_id, lease_token).encode(),
                                   given.encode())
               for k in endpoint.signing_keys)


def field_key(pointer: str) -> Callable[[Any], str]:
    """The flow-control key from the args: a top-level field ("model") or a JSON pointer
    ("/model/name", RFC 6901). A missing or non-scalar value is an error: the enqueue is
    refused as invalid_args, as a @job key function that raises."""
    parts = ([p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
             if pointer.startswith("/") else [pointer])

    def key(args: Any) -> str:
        value = args
        for part in parts:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise KeyError(f"args have no {pointer!r} for the flow-control key")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise TypeError(f"args {pointer!r} is {type(value).__name__}, not a string or "
                            "number (the flow-control key)")
        return str(value)

    return key


class HttpCalls:
    """Calls the endpoints of the HTTP kinds; `install` puts them into a Handlers registry
    (at start and on every reload), replacing what an earlier install put there."""

    def __init__(self, outbound: Outbound, observer: Observer, *,
                 callback_url: str | None = None, wall: Callable[[], float] = time.time):
        self.outbound = outbound
        self.callback_url = callback_url.rstrip("/") if callback_url else None
        self._observer = observer
        self._wall = wall
        self._endpoints: dict[str, Endpoint] = {}
        self._defs: dict[str, JobDef] = {}

    def endpoint(self, kind: str) -> Endpoint | None:
        return self._endpoints.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._endpoints)

    def declared_elsewhere(self, handlers: Handlers, kind: str) -> bool:
        """Whether `kind` is in the registry by another hand (a handler module)."""
        found = handlers.get(kind)
        return found is not None and found is not self._defs.get(kind)

    def install(self, handlers: Handlers, kinds: list[HttpKind]) -> None:
        new = {k.endpoint.kind: k for k in kinds}
        for kind, jobdef in self._defs.items():
            # Only our own: a handler module may have declared the kind since.
            if kind not in new and handlers.get(kind) is jobdef:
                handlers.discard(kind)
        defs = {kind: JobDef(
                    kind=kind, fn=self._handler(spec.endpoint), args_type=dict[str, Any],
                    queue=spec.queue, timeout_s=spec.endpoint.timeout_s,
                    max_attempts=spec.max_attempts, priority=spec.priority, key=spec.key,
                    check_args=spec.check_args)
                for kind, spec in new.items()}
        for jobdef in defs.values():
            handlers.add(jobdef)
        self._defs = defs
        self._endpoints = {kind: spec.endpoint for kind, spec in new.items()}

    def _handler(self, endpoint: Endpoint) -> Callable[..., Any]:
        async def call(ctx: Context, args: dict[str, Any]) -> Any:
            return await self.call(endpoint, ctx, args)

        return call

    def request_body(self, endpoint: Endpoint, ctx: Context, args: dict[str, Any]) -> bytes:
        job = ctx.job
        url = f"{self.callback_url}/v1/jobs/{job.id}" if self.callback_url else None
        return msgspec.json.encode({
            "id": job.id, "kind": job.kind, "queue": job.queue, "key": job.key,
            "attempt": job.attempt, "max_attempts": job.max_attempts, "args": args,
            "errors": [{f: e.get(f) for f in _ERROR_FIELDS} for e in job.errors],
            "deadline": round(self._wall() + endpoint.timeout_s, 3),
            "callback": {
                "token": callback_token(endpoint.signing_keys[0], job.id, ctx.lease_token),
                "url": url, "timeout_s": endpoint.callback_timeout_s,
            },
        })

    async def call(self, endpoint: Endpoint, ctx: Context, args: dict[str, Any]) -> Any:
        body = self.request_body(endpoint, ctx, args)
        headers = sign_headers(endpoint.signing_keys, f"job_{ctx.job.id}_{ctx.job.attempt}",
                               body, now=self._wall())
        started = trio.current_time()
        status_class, outcome = "none", "cancelled"
        try:
            try:
                # With tracing on, the call is a span under the attempt's, and the app
                # continues the trace from its traceparent (W3C); off, both are no-ops.
                with tracing.span("jobd.http_call", {"http.url": endpoint.url,
                                                     "jobd.kind": endpoint.kind}):
                    traceparent = tracing.current_traceparent()
                    if traceparent is not None:
                        headers["traceparent"] = traceparent
                    response = await self.outbound.post(endpoint.url, body, headers,
                                                         endpoint.timeout_s)
            except httpx.TimeoutException as exc:
                # httpx's own messages are often empty: say what did not answer.
                outcome = "timeout"
                raise TimeoutError(f"{endpoint.kind}: {endpoint.url}: no answer within "
                                   f"{endpoint.timeout_s:g} s ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                outcome = "connection_error"
                raise ConnectionError(f"{endpoint.kind}: {endpoint.url}: {type(exc).__name__}: "
                                      f"{_reason(exc)}") from exc
            except DestinationRefused as exc:
                outcome = "refused"
                raise Fail(f"{endpoint.kind}: {exc}") from None
            status_class = f"{response.status // 100}xx"
            try:
                result = self._answer(endpoint, response)
            except AwaitCallback:
                outcome = "callback"
                raise
            except RateLimited:
                outcome = "rate_limited"
                raise
            except EndpointError:
                outcome = "network"
                raise
            except InvalidValue:
                outcome = "result_too_large"
                raise
            except Fail:
                outcome = "failed"
                raise
            outcome = "completed"
            return result
        finally:
            self._observer.http_request(endpoint.kind, status_class, outcome,
                                        trio.current_time() - started)

    def _answer(self, endpoint: Endpoint, response: Any) -> Any:
        """The result of a 2xx; else raises what the retry table classes."""
        status = response.status
        where = f"{endpoint.kind}: {endpoint.url} answered {status}"
        if response.too_large:
            raise InvalidValue(f"{where} with a body over the result limit "
                               "(limits.max_result_bytes)", "result_too_large")
        if 200 <= status < 300:
            try:
                result = msgspec.json.decode(response.body) if response.body.strip() else None
            except msgspec.DecodeError:
                raise Fail(f"{where} with a body that is not JSON: "
                           f"{_snippet(response.body)}") from None
            if status == 202 and isinstance(result, dict) and result.get("callback") is True:
                raise AwaitCallback(endpoint.callback_timeout_s)
            return result
        if status == 429:
            raise RateLimited(retry_after(response.headers.get("retry-after"), self._wall()),
                              f"{where}: rate limited")
        if status == 408 or status >= 500:
            raise EndpointError(status, f"{where}: {_snippet(response.body)}")
        raise Fail(f"{where}: {_snippet(response.body)}")


class EndpointError(Exception):
    """A 408 or 5xx: the retry table reads `status_code` and classes it as network."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status_code = status


def retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _reason(exc: BaseException) -> str:
    """The first non-empty message down the chain (an SSL error's, a refused connect's)."""
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)[:300]
        seen = seen.__cause__ or seen.__context__
    return "no detail"


def _snippet(body: bytes) -> str:
    text = body[: _SNIPPET * 4].decode(errors="replace")
    return text[:_SNIPPET] + ("..." if len(text) > _SNIPPET else "")
