"""Serving the ASGI app: hypercorn's HTTP/1.1 and h2 protocol code under our accept loop.

hypercorn's own `serve` would do, but its accept loop dies on EMFILE, has no connection
cap and lets a client that never reads hold a response write forever. The loop here
caps the connections (at most half the descriptor limit), answers those over the cap
with 503 `too_many_connections`, retries a failed `accept` after a backoff, bounds every
response write, and contains whatever one connection raises. hypercorn is imported
when the server starts, so a daemon without HTTP never loads it.
"""

from __future__ import annotations

import errno
import logging
import resource
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from daemon.api.http import HttpApp
from protocol import commands as c
from protocol.errors import ErrorCode

log = logging.getLogger("jobd.http")

REFUSING_AT_ONCE = 32  # connections over the cap that get a 503 at once; more just close

_encoder = msgspec.json.Encoder()


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
            asgi = wrap_app(self.app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
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
