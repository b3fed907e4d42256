"""daemon.api.http: the ASGI app called in-process, then once through real hypercorn."""

from __future__ import annotations

import errno
import json
import socket
from typing import Any

import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from daemon.api.http import HttpApp
from daemon.api.http_server import HttpServer
from daemon.api.openapi import openapi
from daemon.metrics import Metrics
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError, NotFound, Unavailable

TOKEN = "s3cret-token"
BIG_JOB = 7777
AUTH = {"authorization": f"Bearer {TOKEN}"}


class FakeControl:
    """Answers like actors.control.Control for the handful of commands used here."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def hello(self, cmd: c.Hello) -> c.HelloResult:
        return c.HelloResult(protocol=1, server="jobd/test", commands=c.COMMAND_NAMES)

    async def handle(self, cmd: Any) -> Any:
        self.seen.append(cmd)
        if isinstance(cmd, c.Enqueue):
            if cmd.job.kind == "big":
                raise JobdError("args larger than 1048576 bytes", code=ErrorCode.TOO_LARGE)
            return c.EnqueueResult(id=41, created=True)
        if isinstance(cmd, c.Get):
            if cmd.job_id == 404:
                raise NotFound("no job 404", details={"id": 404})
            if cmd.job_id == BIG_JOB:
                return {"id": cmd.job_id, "result": "x" * (8 << 20)}
            return {"id": cmd.job_id, "state": "completed"}
        if isinstance(cmd, c.Stats):
            raise Unavailable("database unavailable: ConnectionRefusedError")
        if isinstance(cmd, c.Ping):
            return c.Pong(daemon_id="d", region="r", version="0", ready=True, draining=False)
        raise RuntimeError("boom")


class Response(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def make_app(token: str | None = TOKEN, reason: str | None = None,
             control: FakeControl | None = None, **kwargs: Any) -> HttpApp:
    metrics = Metrics(version="0", region="r", daemon_id="d")
    metrics.observer.job_finished("default", "noop", "completed", 0.01)

    async def readiness() -> str | None:
        return reason

    return HttpApp(control=control or FakeControl(), metrics=metrics,
                   readiness=readiness, token=token, **kwargs)


async def call(app: HttpApp, method: str, path: str, body: bytes | list[bytes] = b"",
               headers: dict[str, str] | None = None) -> Response:
    chunks = list(body) if isinstance(body, list) else [body]
    scope = {"type": "http", "method": method, "path": path, "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, *rest = sent
    return Response(status=start["status"],
                    headers={k.decode(): v.decode() for k, v in start["headers"]},
                    body=b"".join(m.get("body", b"") for m in rest))


# --------------------------------------------------------------------------- health, metrics


async def test_healthz():
    response = await call(make_app(token=None), "GET", "/healthz")
    assert (response.status, response.json()) == (200, {"status": "ok"})


async def test_readyz_ready_and_not():
    assert (await call(make_app(), "GET", "/readyz")).status == 200
    response = await call(make_app(reason="draining"), "GET", "/readyz")
    assert (response.status, response.json()) == (503, {"status": "not_ready", "reason": "draining"})


async def test_metrics_needs_no_token():
    response = await call(make_app(token=None), "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(response.body.decode())}
    assert {"jobd_jobs_finished", "jobd_daemon_info"} <= names


async def test_head_and_wrong_method():
    head = await call(make_app(), "HEAD", "/healthz")
    assert (head.status, head.body) == (200, b"")
    wrong = await call(make_app(), "POST", "/metrics")
    assert wrong.status == 405 and wrong.headers["allow"] == "GET, HEAD"


async def test_unknown_path_is_404():
    response = await call(make_app(), "GET", "/nope")
    assert response.status == 404 and response.json()["code"] == "not_found"


# --------------------------------------------------------------------------- auth


async def test_api_is_off_without_a_token():
    response = await call(make_app(token=None), "POST", "/v1/ping", headers=AUTH)
    assert response.status == 403
    body = response.json()
    assert body["type"] == "error" and body["code"] == "unauthorized"
    assert "token_file" in body["message"]


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
    {"authorization": TOKEN}, {"authorization": f"Bearer {TOKEN}x"},
])
async def test_missing_or_wrong_token_is_401(headers):
    response = await call(make_app(), "POST", "/v1/ping", headers=headers)
    assert response.status == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="jobd"'
    assert response.json()["code"] == "unauthorized"


async def test_openapi_needs_the_token_too():
    assert (await call(make_app(), "GET", "/v1/openapi.json")).status == 401


# --------------------------------------------------------------------------- commands


async def test_enqueue_uses_the_command_struct_and_the_ok_envelope():
    control = FakeControl()
    app = make_app(control=control)
    body = json.dumps({"job": {"kind": "noop", "args": {"x": 1}, "queue": "q"}}).encode()
    response = await call(app, "POST", "/v1/enqueue", body, AUTH)
    assert response.status == 200
    assert response.json()["type"] == "ok"
    assert response.json()["result"] == {"id": 41, "created": True}
    [cmd] = control.seen
    assert isinstance(cmd, c.Enqueue) and cmd.job.kind == "noop" and cmd.job.args == {"x": 1}


async def test_empty_body_is_an_empty_command():
    response = await call(make_app(), "POST", "/v1/ping", b"", AUTH)
    assert response.status == 200 and response.json()["result"]["ready"] is True


async def test_hello_answers_without_a_handshake():
    response = await call(make_app(), "POST", "/v1/hello", b'{"protocol": 1}', AUTH)
    assert response.json()["result"]["server"] == "jobd/test"


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/enqueue", b"{not json", 400, "bad_json"),
    ("/v1/enqueue", b"{}", 400, "bad_request"),
    ("/v1/enqueue", b'{"job": {"kind": 7}}', 400, "bad_request"),
    ("/v1/get", b'{"job_id": 404}', 404, "not_found"),
    ("/v1/frobnicate", b"{}", 404, "unknown_command"),
    ("/v1/stats", b"", 503, "unavailable"),
    ("/v1/nodes", b"", 500, "internal"),
])
async def test_error_codes_map_to_statuses(path, body, status, code):
    response = await call(make_app(), "POST", path, body, AUTH)
    assert response.status == status
    payload = response.json()
    assert (payload["type"], payload["code"]) == ("error", code)
    assert set(payload) == {"type", "id", "code", "message", "details"}


async def test_get_alias():
    response = await call(make_app(), "GET", "/v1/jobs/7", headers=AUTH)
    assert response.json() == {"type": "ok", "id": None, "result": {"id": 7, "state": "completed"},
                               "more": False}
    missing = await call(make_app(), "GET", "/v1/jobs/404", headers=AUTH)
    assert missing.status == 404 and missing.json()["details"] == {"id": 404}
    assert (await call(make_app(), "POST", "/v1/jobs/7", headers=AUTH)).status == 405


async def test_command_needs_post():
    response = await call(make_app(), "GET", "/v1/enqueue", headers=AUTH)
    assert response.status == 405 and response.headers["allow"] == "POST"


async def test_body_size_cap():
    app = make_app(max_body=64)
    declared = await call(app, "POST", "/v1/enqueue", b"x" * 65,
                          {**AUTH, "content-length": "65"})
    assert declared.status == 413 and declared.json()["code"] == "frame_too_long"
    streamed = await call(app, "POST", "/v1/enqueue", [b"x" * 40, b"x" * 40], AUTH)
    assert streamed.status == 413


async def test_too_large_from_control_is_413():
    body = b'{"job": {"kind": "big"}}'
    response = await call(make_app(), "POST", "/v1/enqueue", body, AUTH)
    assert response.status == 413 and response.json()["code"] == "too_large"


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    b'{"job": {"kind": "noop", "args": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}}",
    b'{"job": {"kind": "noop", "args": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}}",
])
async def test_deeply_nested_json_is_bad_json(body):
    response = await call(make_app(), "POST", "/v1/enqueue", body, AUTH)
    assert response.status == 400 and response.json()["code"] in {"bad_json", "bad_request"}


async def test_nested_args_past_the_recursion_limit_are_bad_json():
    body = b'{"job": {"kind": "noop", "args": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}}"
    response = await call(make_app(), "POST", "/v1/enqueue", body, AUTH)
    assert (response.status, response.json()["code"]) == (400, "bad_json")


def http_errors(app: HttpApp) -> dict[tuple[str, ...], float]:
    return dict(app._metrics.http_errors.values)


async def test_an_exception_is_contained_logged_and_counted(caplog):
    app = make_app()
    response = await call(app, "POST", "/v1/nodes", b"", AUTH)  # FakeControl raises
    assert response.status == 500 and response.json()["code"] == "internal"
    assert http_errors(app) == {("internal",): 1.0}
    assert any(r.getMessage() == "HTTP POST /v1/nodes failed" for r in caplog.records)


async def test_a_failing_send_does_not_escape():
    """The client is gone while we answer (or hypercorn refuses the message): the
    request ends quietly, nothing reaches hypercorn."""
    app = make_app()
    scope = {"type": "http", "method": "POST", "path": "/v1/nodes", "client": None,
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the client went away")

    await app(scope, receive, send)
    assert http_errors(app) == {("internal",): 1.0}


async def test_a_body_that_never_arrives_is_408(autojump_clock):
    app = make_app(read_timeout_s=30)
    scope = {"type": "http", "method": "POST", "path": "/v1/enqueue", "client": None,
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]}
    chunks = [{"type": "http.request", "body": b'{"job": ', "more_body": True}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with trio.fail_after(3600):
        await app(scope, receive, send)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["code"] == "bad_request" and "http_read_timeout" in body["message"]
    assert http_errors(app) == {("read_timeout",): 1.0}


async def test_lifespan_is_answered():
    app = make_app()
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_document():
    doc = openapi()
    assert doc["openapi"] == "3.1.0"
    for name in c.COMMAND_NAMES:
        assert f"/v1/{name}" in doc["paths"], name
    assert "/v1/jobs/{id}" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    enqueue = doc["components"]["schemas"]["Enqueue"]
    assert "job" in enqueue["required"] and "type" not in enqueue["required"]
    assert "id" not in enqueue["properties"]
    ok = doc["paths"]["/v1/enqueue"]["post"]["responses"]["200"]
    result = ok["content"]["application/json"]["schema"]["properties"]["result"]
    assert result == {"$ref": "#/components/schemas/EnqueueResult"}
    # Every reference resolves.
    text = json.dumps(doc)
    schemas = doc["components"]["schemas"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert doc["paths"]["/metrics"]["get"]["security"] == []


async def test_openapi_served():
    response = await call(make_app(), "GET", "/v1/openapi.json", headers=AUTH)
    assert response.status == 200 and response.json()["info"]["title"] == "jobd"


# --------------------------------------------------------------------------- real hypercorn


async def http_get(stream: trio.abc.Stream, path: str) -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_served_by_hypercorn_on_tcp_and_unix(tmp_path):
    sock = tmp_path / "http.sock"
    server = HttpServer(make_app(), ["127.0.0.1:0", f"unix:{sock}"], graceful_timeout_s=1)
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(server.run)
        tcp = next(u for u in urls if u.startswith("http://127.0.0.1:"))
        port = int(tcp.rsplit(":", 1)[1])
        reply = await http_get(await trio.open_tcp_stream("127.0.0.1", port), "/healthz")
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status":"ok"}')
        reply = await http_get(await trio.open_unix_socket(str(sock)), "/metrics")
        assert reply.startswith(b"HTTP/1.1 200") and b"jobd_daemon_info" in reply
        with trio.fail_after(5):
            await server.stop()
    assert not sock.exists()


async def raw_connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def until(predicate, what: str) -> None:
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - polling a counter in a test
            await trio.sleep(0.01)


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def test_connections_over_the_cap_get_503_and_a_hang_up_frees_a_slot():
    server = HttpServer(make_app(), ["127.0.0.1:0"], graceful_timeout_s=1, max_connections=2,
                        keep_alive_s=60)
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(server.run)
        port = int(url.rsplit(":", 1)[1])
        first, second = await raw_connect(port), await raw_connect(port)
        await until(lambda: server.connections == 2, "two connections")
        third = await raw_connect(port)
        reply = await read_all(third)
        assert reply.startswith(b"HTTP/1.1 503")
        body = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert body["code"] == "too_many_connections" and body["details"] == {"limit": 2}
        assert http_errors(server.app) == {("connection_limit",): 1.0}
        # A client that hangs up frees its slot now, not after the 60 s keep-alive.
        await first.aclose()
        await until(lambda: server.connections == 1, "the slot to be freed")
        reply = await http_get(await raw_connect(port), "/healthz")
        assert reply.startswith(b"HTTP/1.1 200")
        await second.aclose()
        with trio.fail_after(5):
            await server.stop()


async def test_a_client_that_does_not_read_the_response_is_cut():
    server = HttpServer(make_app(), ["127.0.0.1:0"], graceful_timeout_s=1, write_timeout_s=0.3)
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(server.run)
        port = int(url.rsplit(":", 1)[1])
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.send_all(f"GET /v1/jobs/{BIG_JOB} HTTP/1.1\r\nHost: x\r\n"
                              f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        await until(lambda: http_errors(server.app).get(("write_timeout",)) == 1.0,
                    "the write timeout")
        await until(lambda: server.connections == 0, "the connection to be closed")
        await stream.aclose()
        with trio.fail_after(5):
            await server.stop()


class FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """A real listener whose first `accept`s fail as they do out of descriptors."""

    def __init__(self, inner: trio.SocketListener, failures: int):
        self.inner = inner
        self.failures = failures

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_accept_errors_back_off_and_retry(caplog):
    server = HttpServer(make_app(), [])
    [inner] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = inner.socket.getsockname()[1]
    listener = FlakyListener(inner, failures=3)
    served: list[int] = []

    async def connection(stream: trio.SocketStream) -> None:
        served.append(1)
        await stream.send_all(b"hi")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._accept, listener, nursery, connection)
        client = await raw_connect(port)
        assert await read_all(client) == b"hi"
        nursery.cancel_scope.cancel()
    assert served == [1] and server.connections == 0
    assert http_errors(server.app) == {("accept_error",): 3.0}
    warnings = [r for r in caplog.records if r.getMessage().startswith("HTTP accept failed")]
    assert len(warnings) == 1 and "EMFILE" in warnings[0].getMessage()


async def test_an_http2_preface_without_a_request_is_closed_after_keep_alive():
    """hypercorn stops the keep-alive timer at the `PRI` preface and, with no stream
    following, never restarts it: the connection was held forever."""
    server = HttpServer(make_app(), ["127.0.0.1:0"], graceful_timeout_s=1, keep_alive_s=0.2)
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(server.run)
        stream = await raw_connect(int(url.rsplit(":", 1)[1]))
        await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        with trio.fail_after(10):
            await read_all(stream)  # the server's SETTINGS, then the close
        await until(lambda: server.connections == 0, "the connection to be closed")
        with trio.fail_after(5):
            await server.stop()


# --------------------------------------------------------------------------- config


def test_http_bounds_in_the_config(tmp_path):
    from daemon.config import ConfigError, load

    path = tmp_path / "jobd.toml"
    path.write_text('[control]\nhttp_max_connections = 10\nhttp_read_timeout = "2s"\n'
                    'http_write_timeout = "3s"\nhttp_keep_alive = "500ms"\n')
    control = load(path, environ={}).control
    assert (control.http_max_connections, control.http_read_timeout, control.http_write_timeout,
            control.http_keep_alive) == (10, 2.0, 3.0, 0.5)
    defaults = load(None, environ={}).control
    assert (defaults.http_max_connections, defaults.http_read_timeout,
            defaults.http_write_timeout, defaults.http_keep_alive) == (256, 30.0, 30.0, 5.0)
    for bad in ('http_read_timeout = "0s"', "http_keep_alive = 0", 'http_write_timeout = "x"',
                "http_max_connections = 0"):
        path.write_text(f"[control]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"control\.http_"):
            load(path, environ={})
