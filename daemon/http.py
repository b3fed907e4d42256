"""The HTTP surface: a raw ASGI app served by hypercorn inside the daemon's nursery.

Routes:

- `GET /metrics`: the daemon's registry (text 0.0.4, or OpenMetrics when asked); never
  behind the token, never touches the database.
- `GET /healthz`: 200 whenever the event loop answers.
- `GET /readyz`: 200 when the store is healthy, migrations are current and the daemon
  is not draining; else 503 with `{"status": "not_ready", "reason": ...}`.
- `POST /v1/<command>`: the body is the command Struct's fields (the socket's request
  without `type` and `id`), answered by the same `Control.handle` the socket uses, with
  the socket's envelopes: `{"type": "ok", "result": ...}` or
  `{"type": "error", "code", "message", "details"}`; the HTTP status follows the code.
- `GET /v1/jobs/{id}`: `get`, for curl.
- `GET /v1/openapi.json`: OpenAPI 3.1 generated from the protocol Structs.

`/v1/*` needs `Authorization: Bearer <token>` (compared in constant time). No token
configured means the API is off: 403 with a message saying how to turn it on.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from actors.control import Control
from daemon.metrics import Metrics
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError

log = logging.getLogger("jobd.http")

MAX_BODY_BYTES = 8 * 1024 * 1024

# Error code -> HTTP status; a code not listed here is a 500.
STATUS = {
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
_encoder = msgspec.json.Encoder()


def _command_types() -> dict[str, type]:
    return {t.__struct_config__.tag: t for t in c.RESULT_TYPES}  # type: ignore[attr-defined]


class _TooLarge(Exception):
    pass


class HttpApp:
    """The ASGI app. `readiness()` returns None when ready, else the reason it is not."""

    def __init__(
        self,
        *,
        control: Control,
        metrics: Metrics,
        readiness: Callable[[], Awaitable[str | None]],
        token: str | None,
        max_body: int = MAX_BODY_BYTES,
    ):
        self._control = control
        self._metrics = metrics
        self._readiness = readiness
        self._token = token.encode() if token else None
        self._max_body = max_body
        self._commands = _command_types()
        self._decoders = {name: c.JsonDecoder(t) for name, t in self._commands.items()}
        self._openapi: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
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
            elif path == "/v1" or path.startswith("/v1/"):
                self._authorize(scope)
                await self._api(scope, receive, send, path, method)
            else:
                raise JobdError(f"no route {path}", code=ErrorCode.NOT_FOUND)
        except _MethodNotAllowed as exc:
            await _error(send, JobdError(f"{method} not allowed on {path}",
                                         code=ErrorCode.BAD_REQUEST), status=405,
                         extra=[(b"allow", exc.allow.encode())])
        except JobdError as exc:
            extra = []
            if exc.code == ErrorCode.UNAUTHORIZED:
                extra = [(b"www-authenticate", b'Bearer realm="jobd"')]
            status = 403 if isinstance(exc, _ApiDisabled) else STATUS.get(exc.code, 500)
            await _error(send, exc, status=status, extra=extra)
        except _Disconnected:
            return  # the client left; nobody to answer
        except _TooLarge:
            await _error(send, JobdError(f"body larger than {self._max_body} bytes",
                                         code=ErrorCode.FRAME_TOO_LONG), status=413)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the daemon down
            log.exception("HTTP %s %s failed", method, path, extra={"event": "http.crashed"})
            await _error(send, JobdError(f"internal error: {exc}"), status=500)

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
        decoder = self._decoders.get(name)
        if decoder is None:
            raise JobdError(f"unknown command {name!r}; see /v1/openapi.json",
                            code=ErrorCode.UNKNOWN_COMMAND, details={"commands": c.COMMAND_NAMES})
        await self._only(method, "POST")
        body = await self._body(scope, receive)
        try:
            # No body at all means no arguments; anything else must be a JSON object.
            cmd = decoder.decode(body or b"{}")
        except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
            raise JobdError(str(exc), code=ErrorCode.BAD_REQUEST) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise JobdError(str(exc), code=ErrorCode.BAD_JSON) from None
        await self._run(scope, send, cmd)

    async def _run(self, scope: Scope, send: Send, cmd: Any) -> None:
        name = type(cmd).__struct_config__.tag
        if cmd.mutating:
            client = scope.get("client")
            log.info("%s over HTTP from %s", name, client[0] if client else "unix socket",
                     extra={"event": "http.request", "command": name})
        if isinstance(cmd, c.Hello):
            result = self._control.hello(cmd)
        else:
            result = await self._control.handle(cmd)
        await _respond(send, 200, _encoder.encode(c.Ok(result=result)), _JSON)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _headers(scope).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise _TooLarge()
        chunks: list[bytes] = []
        size = 0
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


class _MethodNotAllowed(Exception):
    def __init__(self, allow: str):
        self.allow = allow if allow != "GET" else "GET, HEAD"


class _Disconnected(Exception):
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


async def _error(send: Send, exc: JobdError, *, status: int,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = c.Error(code=str(exc.code), message=exc.message, details=exc.details)
    await _respond(send, status, _encoder.encode(body), _JSON, extra=extra)


# -- OpenAPI -------------------------------------------------------------------------


def openapi() -> dict[str, Any]:
    """OpenAPI 3.1 for /v1, generated from the command and result Structs."""
    from daemon import __version__

    commands = _command_types()
    results = [c.RESULT_TYPES[t] for t in commands.values()]
    template = "#/components/schemas/{name}"
    (_, *_), components = msgspec.json.schema_components(
        [*commands.values(), *results, c.Error], ref_template=template)
    for t in commands.values():
        schema = components.get(t.__name__, {})
        # Over HTTP the path names the command and there is no request id.
        schema.get("properties", {}).pop("id", None)
        schema["required"] = [f for f in schema.get("required", []) if f != "type"]
    error = {"description": "error envelope",
             "content": {"application/json": {"schema": {"$ref": template.format(name="Error")}}}}
    paths: dict[str, Any] = {}
    for name, t in sorted(commands.items()):
        result_schema = msgspec.json.schema_components([c.RESULT_TYPES[t]],
                                                       ref_template=template)[0][0]
        paths[f"/v1/{name}"] = {"post": {
            "operationId": name,
            "summary": (t.__doc__ or name).strip().splitlines()[0],
            "requestBody": {"required": False, "content": {"application/json": {
                "schema": {"$ref": template.format(name=t.__name__)}}}},
            "responses": {
                "200": {"description": "ok envelope", "content": {"application/json": {
                    "schema": _ok(result_schema)}}},
                "default": error,
            },
        }}
    paths["/v1/jobs/{id}"] = {"get": {
        "operationId": "get_job", "summary": "One job (same as POST /v1/get).",
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "integer"}}],
        "responses": {"200": {"description": "ok envelope", "content": {"application/json": {
            "schema": _ok({"$ref": template.format(name="JobView")})}}}, "default": error},
    }}
    paths["/metrics"] = _plain("Prometheus exposition", "text/plain")
    paths["/healthz"] = _plain("200 while the event loop answers", "application/json")
    paths["/readyz"] = _plain("200 when ready, 503 with a reason when not", "application/json")
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobd", "version": __version__,
                 "description": "The control socket's commands as JSON over HTTP."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _ok(result: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["type", "result"], "properties": {
        "type": {"const": "ok"}, "result": result, "id": {"type": "null"},
        "more": {"type": "boolean"}}}


def _plain(summary: str, content_type: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [],
                    "responses": {"200": {"description": summary,
                                          "content": {content_type: {}}}}}}


# -- serving -------------------------------------------------------------------------


class HttpServer:
    """hypercorn on trio, started with `nursery.start(server.run)` and ended by `stop()`."""

    def __init__(self, app: HttpApp, binds: list[str], *, graceful_timeout_s: float = 10.0):
        self.app = app
        self.binds = binds
        self.graceful_timeout_s = graceful_timeout_s
        self._stop = trio.Event()
        self._done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = self.binds
        config.graceful_timeout = self.graceful_timeout_s
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.umask = 0o117  # a unix: socket is born 0660, like the control socket
        try:
            await serve(self.app, config, shutdown_trigger=self._stop.wait,
                        task_status=task_status)
        finally:
            for bind in self.binds:
                if bind.startswith("unix:"):
                    Path(bind.removeprefix("unix:")).unlink(missing_ok=True)
            self._done.set()

    async def stop(self) -> None:
        """Stop accepting; in-flight requests get `graceful_timeout_s` to finish."""
        self._stop.set()
        with trio.move_on_after(self.graceful_timeout_s + 2):
            await self._done.wait()

