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

Bounds (README "Limits"): a body over `limits.max_frame_bytes` is 413 `frame_too_long`;
a body that has not arrived `control.http_read_timeout` after its headers is 408; a
response write the client does not take within `control.http_write_timeout`, or a
connection idle (or without a complete request head) for `control.http_keep_alive`, is
closed; connections over `control.http_max_connections` (at most half the descriptor
limit) are answered 503 `too_many_connections` and closed. A failed `accept` (EMFILE,
ENFILE, ...) is logged, counted and retried after a backoff; an exception inside one
request or connection is logged, counted and answered 500 `internal`.
"""

from __future__ import annotations

import errno
import hmac
import logging
import re
import resource
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from actors.services.control import Control
from daemon.metrics import Metrics
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError

log = logging.getLogger("jobd.http")

MAX_BODY_BYTES = 2 * 1024 * 1024  # the default of limits.max_frame_bytes
READ_TIMEOUT_S = 30.0
REFUSING_AT_ONCE = 32  # connections over the cap that get a 503 at once; more just close

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
        read_timeout_s: float = READ_TIMEOUT_S,
    ):
        self._control = control
        self._metrics = metrics
        self._readiness = readiness
        self._token = token.encode() if token else None
        self._max_body = max_body
        self._read_timeout_s = read_timeout_s
        self._commands = _command_types()
        self._decoders = {name: c.JsonDecoder(t) for name, t in self._commands.items()}
        self._openapi: bytes | None = None

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
                    await _error(send, JobdError(
                        f"internal error: {type(exc).__name__}: {exc}"[:500]), status=500)
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
            # The rest of the body is not read: the connection closes after this answer.
            self.count("too_large")
            await _error(send, JobdError(
                f"request body larger than {self._max_body} bytes (limits.max_frame_bytes)",
                code=ErrorCode.FRAME_TOO_LONG, details={"limit": self._max_body}),
                status=413, extra=[(b"connection", b"close")])
        except _BodyTimeout:
            self.count("read_timeout")
            log.info("HTTP %s %s: body not received within %gs", method, path,
                     self._read_timeout_s, extra={"event": "http.read_timeout"})
            await _error(send, JobdError(
                f"request body not received within {self._read_timeout_s:g}s "
                "(control.http_read_timeout)", code=ErrorCode.BAD_REQUEST,
                details={"timeout_s": self._read_timeout_s}),
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
        except RecursionError:
            raise JobdError("JSON nested too deeply", code=ErrorCode.BAD_JSON) from None
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
    """hypercorn's HTTP/1.1 and h2 protocol code on trio, started with
    `nursery.start(server.run)` and ended by `stop()`.

    The accept loop is ours, not hypercorn's `serve`: it caps the connections, answers
    those over the cap with 503, survives any `accept` error (EMFILE, ENFILE, ...: log,
    count, back off, retry), bounds every response write, and contains whatever one
    connection raises.
    """

    def __init__(self, app: HttpApp, binds: list[str], *, graceful_timeout_s: float = 10.0,
                 max_connections: int = 256, keep_alive_s: float = 5.0,
                 write_timeout_s: float = 30.0):
        self.app = app
        self.binds = binds
        self.graceful_timeout_s = graceful_timeout_s
        self.max_connections = max_connections
        self.keep_alive_s = keep_alive_s
        self.write_timeout_s = write_timeout_s
        self.connections = 0
        self._refusing = 0
        self._refusal = b""
        self._accept_errors = 0
        self._accept_logged_at = -1e9
        self._stop = trio.Event()
        self._done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        from hypercorn.config import Config
        TCPServer = _tcp_server_class()  # noqa: N806 - a class
        from hypercorn.trio.worker_context import WorkerContext
        from hypercorn.typing import ConnectionState
        from hypercorn.utils import repr_socket_addr, wrap_app

        config = Config()
        config.bind = self.binds
        config.graceful_timeout = self.graceful_timeout_s
        config.keep_alive_timeout = self.keep_alive_s
        config.backlog = 1024  # a burst waits in the kernel, not refused there (default 100)
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.umask = 0o117  # a unix: socket is born 0660, like the control socket
        self.max_connections = _connection_budget(self.max_connections)
        self._refusal = _refusal(self.max_connections)
        try:
            sockets = config.create_sockets()
            listeners = []
            urls = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            context = WorkerContext(None)
            asgi = wrap_app(self.app, config.wsgi_max_body_size, "asgi")
            state = ConnectionState({})

            async def connection(stream: trio.SocketStream) -> None:
                bounded = _BoundedStream(stream, self)
                bounded.tcp = TCPServer(asgi, config, context, state,  # type: ignore[arg-type]
                                        bounded)
                await bounded.tcp

            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept, listener, handlers, connection)
                    task_status.started(urls)
                    await self._stop.wait()
                    accepting.cancel_scope.cancel()  # the listeners close
                # Idle keep-alives close now, busy ones after their current response.
                await context.terminated.set()
                handlers.cancel_scope.deadline = trio.current_time() + self.graceful_timeout_s
        finally:
            for bind in self.binds:
                if bind.startswith("unix:"):
                    Path(bind.removeprefix("unix:")).unlink(missing_ok=True)
            self._done.set()

    async def _accept(self, listener: trio.SocketListener, handlers: trio.Nursery,
                      connection: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
        backoff = 0.0
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    # EMFILE/ENFILE (out of descriptors), ENOBUFS/ENOMEM, or anything
                    # else: never fatal. The pending connection waits in the backlog.
                    backoff = min(max(backoff * 2, 0.05), 1.0)
                    self._accept_failed(exc, backoff)
                    await trio.sleep(backoff)
                    continue
                backoff = 0.0
                if self.connections >= self.max_connections:
                    self.app.count("connection_limit")
                    if self._refusing < REFUSING_AT_ONCE:
                        self._refusing += 1
                        handlers.start_soon(self._refuse, stream)
                    else:
                        stream.socket.close()
                    continue
                self.connections += 1
                handlers.start_soon(self._serve, stream, connection)

    def _accept_failed(self, exc: OSError, backoff: float) -> None:
        self.app.count("accept_error")
        self._accept_errors += 1
        now = trio.current_time()
        if now - self._accept_logged_at >= 10.0:  # a storm logs once every 10 s
            self._accept_logged_at = now
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            log.warning("HTTP accept failed: %s (%s); retrying in %gs (%d failures so far; "
                        "%d HTTP connections open)", name, exc.strerror, backoff,
                        self._accept_errors, self.connections,
                        extra={"event": "http.accept_failed", "errno": name})

    async def _serve(self, stream: trio.SocketStream,
                     connection: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
        try:
            await connection(stream)
        except Exception:  # noqa: BLE001 - one connection never takes the server down
            self.app.count("internal")
            log.exception("HTTP connection failed", extra={"event": "http.crashed"})
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """503 `too_many_connections` and close; a client that does not take it in 1 s
        is just closed."""
        try:
            with trio.move_on_after(1.0):
                await stream.send_all(self._refusal)
                await stream.send_eof()
                # Read what the client sent, so closing does not reset the connection
                # before it has read the 503.
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    async def stop(self) -> None:
        """Stop accepting; in-flight requests get `graceful_timeout_s` to finish."""
        self._stop.set()
        with trio.move_on_after(self.graceful_timeout_s + 2):
            await self._done.wait()


class _BoundedStream(trio.abc.HalfCloseableStream):
    """A SocketStream whose writes the client must take within the write timeout (else
    the connection is cut: hypercorn shields its writes from cancellation, not from an
    inner deadline)."""

    def __init__(self, stream: trio.SocketStream, server: HttpServer):
        self._stream = stream
        self._server = server
        self.socket = stream.socket  # hypercorn reads the peer and local addresses
        self.tcp: Any = None  # hypercorn's TCPServer for this connection

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.move_on_after(self._server.write_timeout_s) as deadline:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._client_gone()
                raise
        if deadline.cancelled_caught:
            self._server.app.count("write_timeout")
            log.info("HTTP client did not read a response within %gs; closing",
                     self._server.write_timeout_s, extra={"event": "http.write_timeout"})
            await trio.aclose_forcefully(self._stream)
            await self._client_gone()
            raise trio.BrokenResourceError("the client did not read the response in time")

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.tcp is not None:
            await self.tcp.idle_check()
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._client_gone()
            raise
        if not data:
            await self._client_gone()
        return data

    async def _client_gone(self) -> None:
        # hypercorn ends the connection when the client hangs up (or a write fails), but
        # then waits out its keep-alive timer, restarted after the last response, before
        # closing the socket: from now on that timer is zero, so the socket is closed at
        # once (the connection's slot is free when a request still running has ended).
        tcp = self.tcp
        if tcp is not None and not tcp.gone:
            tcp.gone = True
            if getattr(tcp, "_task_group", None) is not None:
                await tcp.idle_task.restart(tcp._task_group, tcp._idle_timeout)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


_TCP_SERVER: Any = None


def _tcp_server_class() -> Any:
    """hypercorn's TCPServer, whose keep-alive timer is zero once the client is gone."""
    global _TCP_SERVER
    if _TCP_SERVER is None:
        from hypercorn.protocol.h2 import H2Protocol
        from hypercorn.trio.tcp_server import TCPServer

        class _TCPServer(TCPServer):
            gone = False

            async def idle_check(self) -> None:
                """Before each read: an HTTP/2 connection with no request open gets its
                keep-alive timer back (hypercorn stops the timer at the `PRI` preface
                and never restarts it when no stream follows: held forever)."""
                protocol = getattr(getattr(self, "protocol", None), "protocol", None)
                if (isinstance(protocol, H2Protocol) and protocol.idle
                        and self.idle_task._handle is None):
                    await self.idle_task.restart(self._task_group, self._idle_timeout)

            async def _idle_timeout(self) -> None:
                if not self.gone:
                    await super()._idle_timeout()
                    return
                with trio.CancelScope(shield=True):
                    await self._initiate_server_close()

        _TCP_SERVER = _TCPServer
    return _TCP_SERVER


def _connection_budget(configured: int) -> int:
    """HTTP connections never hold more than half the daemon's descriptors, so a flood
    leaves room for the control socket, the database pool and the daemon's files."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return configured
    if soft == resource.RLIM_INFINITY or configured <= soft // 2:
        return configured
    budget = max(1, soft // 2)
    log.warning("control.http_max_connections = %d lowered to %d: the descriptor limit is %d",
                configured, budget, soft, extra={"event": "http.max_connections_lowered"})
    return budget


def _refusal(limit: int) -> bytes:
    body = _encoder.encode(c.Error(
        code=str(ErrorCode.TOO_MANY_CONNECTIONS),
        message=f"HTTP connection limit reached ({limit} open; control.http_max_connections)",
        details={"limit": limit}))
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body
