"""The generic HTTP handler's pure parts: how an answer maps onto the retry table, the
Retry-After forms, the key from args, the callback token."""

from __future__ import annotations

import email.utils
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors import retry, tracing
from actors.context import JobInfo
from actors.errors import AwaitCallback
from actors.http_handler import (
    Endpoint,
    HttpCalls,
    callback_token,
    field_key,
    retry_after,
    token_matches,
)
from actors.ports import NullObserver
from actors.services.outbound import Outbound, Response
from actors.services.outcomes import InvalidValue
from daemon.config.sections import Tracing
from daemon.tracing import provider

ENDPOINT = Endpoint("k", "http://127.0.0.1/x", [b"key"], timeout_s=5, callback_timeout_s=60)
CALLS = HttpCalls(Outbound(allow_hosts=[]), NullObserver(), wall=lambda: 1000.0)


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None,
           too_large: bool = False):
    return CALLS._answer(ENDPOINT, Response(status, headers or {}, body, too_large))


@pytest.mark.parametrize(("status", "headers", "cls", "pause"), [
    (429, {"retry-after": "7"}, "rate_limit", 7.0),
    (429, {}, "rate_limit", None),
    (500, {}, "network", None),
    (503, {}, "network", None),
    (408, {}, "network", None),
    (400, {}, "fail", None),
    (401, {}, "fail", None),
    (404, {}, "fail", None),
    (422, {}, "fail", None),
    (302, {}, "fail", None),  # a redirect not followed
])
def test_status_to_retry_class(status, headers, cls, pause):
    with pytest.raises(Exception) as caught:
        answer(status, b'{"error": "x"}', headers)
    assert retry.error_class(caught.value) == cls
    assert retry.stated_pause(caught.value) == pause
    assert "k: http://127.0.0.1/x answered" in str(caught.value)


def test_2xx_results():
    assert answer(200, b'{"a": 1}') == {"a": 1}
    assert answer(204) is None
    assert answer(202, b'{"queued": true}') == {"queued": True}  # no callback asked for
    with pytest.raises(AwaitCallback) as caught:
        answer(202, b'{"callback": true}')
    assert caught.value.timeout_s == 60
    with pytest.raises(Exception, match="not JSON") as not_json:
        answer(200, b"<html>")
    assert retry.error_class(not_json.value) == "fail"
    with pytest.raises(InvalidValue) as big:
        answer(200, too_large=True)
    assert big.value.error_class == "result_too_large"


def test_retry_after_forms():
    assert retry_after("12", 0) == 12.0
    assert retry_after(" 1.5 ", 0) == 1.5
    assert retry_after("-3", 0) == 0.0
    when = email.utils.formatdate(1030, usegmt=True)
    assert retry_after(when, 1000) == pytest.approx(30)
    assert retry_after("soon", 0) is None
    assert retry_after(None, 0) is None


def test_field_key():
    assert field_key("market")({"market": "ebay"}) == "ebay"
    assert field_key("/model/name")({"model": {"name": "gpt"}}) == "gpt"
    assert field_key("/a~1b/0")({"a/b": [7]}) == "7"
    for bad in ({}, {"market": None}, {"market": True}, {"market": {"x": 1}}):
        with pytest.raises((KeyError, TypeError)):
            field_key("market")(bad)


def test_callback_token_is_bound_to_job_attempt_and_key():
    token = callback_token(b"key", 7, 3)
    assert token_matches(ENDPOINT, 7, 3, token)
    assert not token_matches(ENDPOINT, 7, 4, token)  # a later attempt
    assert not token_matches(ENDPOINT, 8, 3, token)
    rotated = Endpoint("k", "http://x/", [b"new", b"key"], 5, 60)
    assert token_matches(rotated, 7, 3, token)
    assert not token_matches(ENDPOINT, 7, 3, token + "x")


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        _Recorder.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


class _Ctx:
    lease_token = 1
    job = JobInfo(id=5, kind="k", queue="q", key=None, attempt=1, max_attempts=3, tags=[],
                  unique_key=None, priority=0, run_at=datetime.now(UTC),
                  created_at=datetime.now(UTC), errors=[])


async def test_the_request_carries_traceparent_only_when_tracing_is_on():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = Endpoint("k", f"http://127.0.0.1:{server.server_address[1]}/", [b"key"], 5, 60)
    calls = HttpCalls(Outbound(allow_hosts=[]), NullObserver())
    exporter = InMemorySpanExporter()
    traced = provider(Tracing(enabled=True, sample_ratio=1.0), region="r", daemon_id="d",
                      processor=SimpleSpanProcessor(exporter))
    try:
        assert await calls.call(endpoint, _Ctx(), {}) == {}
        tracing.install(traced.get_tracer("jobd"))
        assert await calls.call(endpoint, _Ctx(), {}) == {}
    finally:
        tracing.install(None)
        server.shutdown()
        await calls.outbound.aclose()
    off, on = _Recorder.seen[-2:]
    assert "traceparent" not in off
    [span] = [s for s in exporter.get_finished_spans() if s.name == "jobd.http_call"]
    assert on["traceparent"] == (f"00-{span.context.trace_id:032x}-"
                                 f"{span.context.span_id:016x}-"
                                 f"{int(span.context.trace_flags):02x}")
