"""The outbound client against a real loopback server: allow-list, redirects, body cap,
per-origin concurrency."""

from __future__ import annotations

import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import trio

from actors import retry
from actors.services.outbound import DestinationRefused, Outbound, check_destination

IN_FLIGHT = {"now": 0, "max": 0}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("location", "/echo")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if self.path == "/big":
            payload = b"x" * 50_000
        elif self.path == "/slow":
            with LOCK:
                IN_FLIGHT["now"] += 1
                IN_FLIGHT["max"] = max(IN_FLIGHT["max"], IN_FLIGHT["now"])
            time.sleep(0.2)
            with LOCK:
                IN_FLIGHT["now"] -= 1
            payload = b"{}"
        else:
            payload = body
        self.send_response(200)
        self.send_header("content-length", str(len(payload)))
        self.send_header("X-Echo", self.headers.get("x-test", ""))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(("url", "allow", "ok"), [
    ("https://app.example.com/x", [], True),
    ("https://app.example.com/x", ["app.example.com"], True),
    ("https://App.Example.com/x", [".example.com"], True),
    ("https://evil.com/x", [".example.com"], False),
    ("https://example.com.evil.com/x", ["example.com"], False),
    ("file:///etc/passwd", [], False),
    ("ftp://example.com/", [], False),
    ("http:///nohost", [], False),
])
def test_destinations(url: str, allow: list[str], ok: bool) -> None:
    if ok:
        check_destination(url, allow)
    else:
        with pytest.raises(DestinationRefused):
            check_destination(url, allow)


async def test_post_echoes_and_lowercases_headers(base: str) -> None:
    out = Outbound(allow_hosts=["127.0.0.1"])
    try:
        r = await out.post(base + "/echo", b'{"a":1}', {"x-test": "yes"}, 5)
    finally:
        await out.aclose()
    assert (r.status, r.body, r.headers["x-echo"], r.too_large) == (200, b'{"a":1}', "yes", False)


async def test_refused_host_never_connects(base: str) -> None:
    out = Outbound(allow_hosts=["example.com"])
    try:
        with pytest.raises(DestinationRefused):
            await out.post(base + "/echo", b"{}", {}, 5)
    finally:
        await out.aclose()


async def test_redirects_are_not_followed(base: str) -> None:
    out = Outbound(allow_hosts=[])
    try:
        r = await out.post(base + "/redirect", b"{}", {}, 5)
    finally:
        await out.aclose()
    assert r.status == 307


async def test_a_body_over_the_cap_is_not_buffered(base: str) -> None:
    out = Outbound(allow_hosts=[], max_body_bytes=10_000)
    try:
        r = await out.post(base + "/big", b"{}", {}, 5)
    finally:
        await out.aclose()
    assert (r.status, r.too_large, r.body) == (200, True, b"")


async def test_per_origin_concurrency_is_bounded(base: str) -> None:
    out = Outbound(allow_hosts=[], per_origin=2)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(out.post, base + "/slow", b"{}", {}, 5)
    finally:
        await out.aclose()
    assert IN_FLIGHT["max"] == 2


async def test_a_refused_connection_raises_httpx_connect_error() -> None:
    out = Outbound(allow_hosts=[])
    try:
        with pytest.raises(httpx.ConnectError):
            await out.post("http://127.0.0.1:9/", b"{}", {}, 2)
    finally:
        await out.aclose()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed (apt-get install -y openssl; .ci/run does it as root)")
async def test_tls_is_verified(tmp_path):
    """A self-signed certificate is refused: the call fails as a network error."""
    await trio.run_process(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], capture_stdout=True, capture_stderr=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outbound = Outbound(allow_hosts=[])
        with pytest.raises(httpx.ConnectError) as caught:
            await outbound.post(f"https://127.0.0.1:{server.server_address[1]}/echo", b"{}",
                                {}, 5)
        assert retry.error_class(caught.value) == "network"
        chain: list[BaseException] = []
        seen: BaseException | None = caught.value
        while seen is not None:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain
        await outbound.aclose()
    finally:
        server.shutdown()
