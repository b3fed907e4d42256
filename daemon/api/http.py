"""The HTTP surface: a raw ASGI app, served by `daemon.api.http_server`.

Routes:

- `GET /metrics`: the daemon's registry (text 0.0.4, or OpenMetrics when asked); never
  behind the token, never touches the database.
- `GET /healthz`: 200 whenever the event loop answers.
- `GET /readyz`: 200 when the store is healthy, migrations are current and the daemon
  is not draining; else 503 with `{"status": "not_ready", "reason": ...}`.
- `POST /v1/<command>`: the body is the command Struct's fields (the socket's request
  without `type` and `id`), answered through the same `daemon.api.requests` as the
  socket, with the socket's envelopes: `{"type": "ok", "result": ...}` or
  `{"type": "error", "code", "message", "details"}`; the HTTP status follows the code.
- `GET /v1/jobs/{id}`: `get`, for curl.
- `POST /v1/jobs/{id}/complete` (`/fail`, `/progress`, `/heartbeat`): an HTTP handler's
  app calling back (protocol/callbacks.py); the body's `token` (the job's callback token)
  is the authorization, so these need no API token.
- `GET /v1/openapi.json`: OpenAPI 3.1 generated from the protocol Structs
  (`daemon.api.openapi`).
- `/ui/...`: the dashboard (`daemon.dashboard`), with its own sign-in and sessions.

`/v1/*` needs `Authorization: Bearer <token>` (compared in constant time). No token
configured means the API is off: 403 with a message saying how to turn it on.

Bounds (README "Limits"): a body over `limits.max_frame_bytes` is 413 `frame_too_long`;
a body that has not arrived `control.http_read_timeout` after its headers is 408; a
response write the client does not take within `control.http_write_timeout`, or a
connection idle (or without a complete request head) for `control.http_keep_alive`, is
closed (`daemon.api.http_server` does the connection bounds). An exception inside one
request is logged, counted and answered 500 `internal`.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from daemon.api.openapi import openapi
from daemon.api.requests import COMMANDS, Answers, Peer, Requests, decode, error
from daemon.metrics import Metrics
from protocol import commands as c
from protocol.errors import BadRequest, ErrorCode, JobdError

if TYPE_CHECKING:
    from daemon.dashboard.app import Dashboard

log = logging.getLogger("jobd.http")

MAX_BODY_BYTES = 2 * 1024 * 1024  # the default of limits.max_frame_bytes
READ_TIMEOUT_S = 30.0

# Error code -> HTTP status; a code not listed here is a 500.
STATUS: dict[str, int] = {
    ErrorCode.BAD_JSON: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNSUPPORTED_PROTOCOL: 400,
    ErrorCode.HANDSHAKE_REQUIRED: 400,
    ErrorCode.UNKNOWN_COMMAND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FRAME_TOO_LONG: 413,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_KIND: 422,
    ErrorCode.INVALID_ARGS: 422,
    ErrorCode.CONFLICT: 409,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TOO_MANY_CONNECTIONS: 503,
    ErrorCode.INTERNAL: 500,
}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = b"application/json"
_JOB_PATH = re.compile(r"^/v1/jobs/([0-9]{1,19})$")
_CALLBACK_PATH = re.compile(r"^/v1/jobs/([0-9]{1,19})/(complete|fail|progress|heartbeat)$")
_encoder = msgspec.json.Encoder()
_object = c.JsonDecoder(dict[str, Any])


class _TooLarge(Exception):
    pass


class HttpApp:
    """The ASGI app. `readiness()` returns None when ready, else the reason it is not."""

    def __init__(
        self,
        *,
        control: Answers,
        metrics: Metrics,
        readiness: Callable[[], Awaitable[str | None]],
        token: str | None,
        max_body: int = MAX_BODY_BYTES,
        read_timeout_s: float = READ_TIMEOUT_S,
        dashboard: Dashboard | None = None,
    ):
        self._requests = Requests(control, "http")
        self._metrics = metrics
        self._readiness = readiness
        self._token = token.encode() if token else None
        self._max_body = max_body
        self._read_timeout_s = read_timeout_s
        self._openapi: bytes | None = None
        self._dashboard = dashboard

    def count(self, reason: str) -> None:
        self._metrics.http_errors.inc((reason,))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._contained(scope, receive, send)
        elif scope["type"] == "lifespan":
            # Implemented, not refused: hypercorn's trio worker needs an answer either way,
            # and a refusal logs a warning at every start.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            raise RuntimeError(f"unsupported ASGI scope {scope['type']!r}")

    async def _contained(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request: whatever it raises is logged, counted and, if no response has
        started yet, answered 500 `internal`; nothing reaches hypercorn."""
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._http(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the daemon down
            log.exception("HTTP %s %s failed", scope.get("method"), scope.get("path"),
                          extra={"event": "http.crashed"})
            self.count("internal")
            if not started:
                try:
                    await _error(send, error(JobdError(
                        f"internal error: {type(exc).__name__}: {exc}"[:500])))
                except Exception:  # noqa: BLE001 - the client is gone; nothing to tell
                    pass

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path == "/metrics":
                await self._only(method, "GET")
                headers = _headers(scope)
                body, content_type = self._metrics.exposition(headers.get(b"accept", b"").decode())
                await _respond(send, 200, body, content_type.encode(), head=method == "HEAD")
            elif path == "/healthz":
                await self._only(method, "GET")
                await _json(send, 200, {"status": "ok"}, head=method == "HEAD")
            elif path == "/readyz":
                await self._only(method, "GET")
                reason = await self._readiness()
                if reason is None:
                    await _json(send, 200, {"status": "ready"}, head=method == "HEAD")
                else:
                    await _json(send, 503, {"status": "not_ready", "reason": reason},
                                head=method == "HEAD")
            elif match := _CALLBACK_PATH.match(path):
                await self._only(method, "POST")
                body = await self._body(scope, receive)
                await self._run(scope, send, self._callback(match, body))
            elif self._dashboard is not None and (path == "/ui" or path.startswith("/ui/")):
                await self._dashboard(scope, send, lambda: self._body(scope, receive))
            elif path == "/v1" or path.startswith("/v1/"):
                self._authorize(scope)
                await self._api(scope, receive, send, path, method)
            else:
                raise JobdError(f"no route {path}", code=ErrorCode.NOT_FOUND)
        except _MethodNotAllowed as exc:
            await _error(send, error(JobdError(f"{method} not allowed on {path}",
                                               code=ErrorCode.BAD_REQUEST)), status=405,
                         extra=[(b"allow", exc.allow.encode())])
        except JobdError as exc:
            await _error(send, error(exc), status=403 if isinstance(exc, _ApiDisabled) else None)
        except _Disconnected:
            return  # the client left; nobody to answer
        except _TooLarge:
            # The rest of the body is not read: the connection closes after this answer.
            self.count("too_large")
            await _error(send, error(JobdError(
                f"request body larger than {self._max_body} bytes (limits.max_frame_bytes)",
                code=ErrorCode.FRAME_TOO_LONG, details={"limit": self._max_body})),
                extra=[(b"connection", b"close")])
        except _BodyTimeout:
            self.count("read_timeout")
            log.info("HTTP %s %s: body not received within %gs", method, path,
                     self._read_timeout_s, extra={"event": "http.read_timeout"})
            await _error(send, error(JobdError(
                f"request body not received within {self._read_timeout_s:g}s "
                "(control.http_read_timeout)", code=ErrorCode.BAD_REQUEST,
                details={"timeout_s": self._read_timeout_s})),
                status=408, extra=[(b"connection", b"close")])

    async def _only(self, method: str, allowed: str) -> None:
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            raise _MethodNotAllowed(allowed)

    def _authorize(self, scope: Scope) -> None:
        if self._token is None:
            raise _ApiDisabled(
                "the HTTP API is disabled: no token configured (set control.token_file or "
                "the systemd credential api-token)")
        given = _headers(scope).get(b"authorization", b"")
        scheme, _, credential = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(),
                                                                  self._token):
            raise JobdError("missing or wrong bearer token", code=ErrorCode.UNAUTHORIZED)

    async def _api(self, scope: Scope, receive: Receive, send: Send, path: str,
                   method: str) -> None:
        if path == "/v1/openapi.json":
            await self._only(method, "GET")
            if self._openapi is None:
                self._openapi = _encoder.encode(openapi())
            await _respond(send, 200, self._openapi, _JSON, head=method == "HEAD")
            return
        if match := _JOB_PATH.match(path):
            await self._only(method, "GET")
            await self._run(scope, send, c.Get(job_id=int(match.group(1))))
            return
        name = path.removeprefix("/v1/")
        if name not in COMMANDS:
            raise JobdError(f"unknown command {name!r}; see /v1/openapi.json",
                            code=ErrorCode.UNKNOWN_COMMAND, details={"commands": c.COMMAND_NAMES})
        await self._only(method, "POST")
        body = await self._body(scope, receive)
        traceparent = _headers(scope).get(b"traceparent")
        await self._run(scope, send, self._requests.decode_body(name, body, traceparent))

    def _callback(self, match: re.Match[str], body: bytes) -> c.Command:
        """The callback command: the job id from the path, the rest from the body."""
        fields = decode(_object, body or b"{}")
        job_id = int(match.group(1))
        if fields.get("job_id", job_id) != job_id:
            raise BadRequest(f"job_id {fields['job_id']!r} in the body is not the path's "
                             f"{job_id}", details={"field": "job_id"})
        return self._requests.decode_body(f"job_{match.group(2)}",
                                          _encoder.encode({**fields, "job_id": job_id}))

    async def _run(self, scope: Scope, send: Send, cmd: c.Command) -> None:
        client = scope.get("client")
        peer = Peer(f"over HTTP from {client[0] if client else 'unix socket'}")
        reply = await self._requests.answer(cmd, peer)
        if isinstance(reply, c.Error):
            await _error(send, reply)
        else:
            await _respond(send, 200, _encoder.encode(reply), _JSON)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _headers(scope).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise _TooLarge()
        chunks: list[bytes] = []
        size = 0
        # The whole body, not each read: a client dribbling a byte at a time is cut too.
        with trio.move_on_after(self._read_timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._max_body:
                    raise _TooLarge()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        assert deadline.cancelled_caught
        raise _BodyTimeout()


class _MethodNotAllowed(Exception):
    def __init__(self, allow: str):
        self.allow = allow if allow != "GET" else "GET, HEAD"


class _Disconnected(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class _ApiDisabled(JobdError):
    """No token configured: 403, whatever the request carries."""

    code = ErrorCode.UNAUTHORIZED


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


async def _respond(send: Send, status: int, body: bytes, content_type: bytes, *,
                   head: bool = False, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _json(send: Send, status: int, value: Any, *, head: bool = False) -> None:
    await _respond(send, status, _encoder.encode(value), _JSON, head=head)


async def _error(send: Send, reply: c.Error, *, status: int | None = None,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """An error envelope; the status follows its code unless the route says otherwise."""
    headers = list(extra or [])
    if reply.code == ErrorCode.UNAUTHORIZED:
        headers.append((b"www-authenticate", b'Bearer realm="jobd"'))
    await _respond(send, status or STATUS.get(reply.code, 500), _encoder.encode(reply), _JSON,
                   extra=headers)
