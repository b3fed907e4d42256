"""Tracing with the real `jobd run` ([tracing] enabled) and a local OTLP/HTTP receiver: the
spans arrive over OTLP/HTTP (protobuf) with their attributes and resource; a producer's
traceparent (socket field, HTTP header or body, SQL `jobd.enqueue(traceparent => ...)`)
is the parent of its job's attempt spans; a bad one is a typed error on each surface;
an endpoint that refuses connections costs jobs nothing; a drain flushes what is queued.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from protocol.client import SyncClient
from protocol.errors import JobdError
from tests.support import run_async, wait_until

TOKEN = "e2e-tracing-token-0123456789"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def producer(span_id: str) -> str:
    return f"00-{TRACE_ID}-{span_id}-01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        spans, lock = self.spans, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with lock:
                    outer.requests += 1
                    for rs in request.resource_spans:
                        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                spans.append({
                                    "name": s.name, "trace_id": s.trace_id.hex(),
                                    "span_id": s.span_id.hex(),
                                    "parent": s.parent_span_id.hex() or None,
                                    "attributes": {a.key: _value(a.value) for a in s.attributes},
                                    "links": [(k.trace_id.hex(), k.span_id.hex()) for k in s.links],
                                    "status": s.status.code, "resource": resource,
                                    "path": self.path, "content_type": self.headers["Content-Type"],
                                })
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        return sorted((s for s in list(self.spans) if s["name"] == "jobd.attempt"
                       and s["attributes"].get("jobd.job_id") == job_id),
                      key=lambda s: s["attributes"]["jobd.attempt"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def tracing_toml(endpoint: str) -> str:
    return (f'[tracing]\nenabled = true\nendpoint = "{endpoint}"\n'
            'service_name = "jobd-e2e"\nsample_ratio = 1.0\n')


@pytest.fixture
def traced_daemon(jobd, tmp_path, receiver):
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = jobd(modules=["tests.e2e.tracing_handlers"], region="eu-west",
                control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)},
                extra_toml=tracing_toml(receiver.endpoint))
    proc.base = f"http://127.0.0.1:{port}"
    return proc


def post(base: str, path: str, body: Any, headers: dict[str, str] | None = None
         ) -> tuple[int, Any]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sql_enqueue(url: str, kind: str, traceparent: str) -> int:
    async def main() -> int:
        conn = await asyncpg.connect(url)
        try:
            job_id: int = await conn.fetchval(
                "SELECT jobd.enqueue($1, '{}'::jsonb, traceparent => $2)", kind, traceparent)
            return job_id
        finally:
            await conn.close()
    result: int = run_async(main)
    return result


def test_spans_arrive_over_otlp_with_the_producers_context_as_parent(
        traced_daemon, receiver, sql, fresh_database):
    client = SyncClient(str(traced_daemon.socket))
    # The socket: the field of the enqueue command; a job that fails once, then runs a step.
    by_socket = client.enqueue("traced.flaky", {}, traceparent=producer("00f067aa0ba902b7")).id
    # HTTP: the traceparent header; a body's own field wins over the header.
    status, header_reply = post(traced_daemon.base, "/v1/enqueue", {"job": {"kind": "traced.user"}},
                                {"traceparent": producer("1111111111111111")})
    assert status == 200, header_reply
    status, body_reply = post(traced_daemon.base, "/v1/enqueue", {"job": {
        "kind": "traced.user", "traceparent": producer("2222222222222222")}},
        {"traceparent": producer("3333333333333333")})
    assert status == 200, body_reply
    status, batch_reply = post(traced_daemon.base, "/v1/enqueue_batch", {"jobs": [
        {"kind": "traced.user"}, {"kind": "traced.user"}]},
        {"traceparent": producer("4444444444444444")})
    assert status == 200, batch_reply
    by_sql = sql_enqueue(fresh_database, "traced.user", producer("5555555555555555"))
    untraced = client.enqueue("traced.user", {}).id

    expected = {
        by_socket: "00f067aa0ba902b7", header_reply["result"]["id"]: "1111111111111111",
        body_reply["result"]["id"]: "2222222222222222",
        **{i: "4444444444444444" for i in batch_reply["result"]["ids"]},
        by_sql: "5555555555555555",
    }
    wait_until(lambda: len(receiver.attempts(by_socket)) == 2
               and all(receiver.attempts(i) for i in [*expected, untraced]),
               "every job's attempt spans at the receiver", timeout=30)

    for job_id, span_id in expected.items():
        for attempt in receiver.attempts(job_id):
            assert (attempt["trace_id"], attempt["parent"]) == (TRACE_ID, span_id), job_id
    [alone] = receiver.attempts(untraced)
    assert alone["parent"] is None and alone["trace_id"] != TRACE_ID

    first, second = receiver.attempts(by_socket)
    assert first["attributes"]["jobd.outcome"] == "retried"
    assert first["attributes"]["jobd.error_class"] == "unknown"
    assert first["status"] == 2  # STATUS_CODE_ERROR
    assert second["attributes"]["jobd.outcome"] == "completed"
    assert second["links"] == [(first["trace_id"], first["span_id"])]
    for attempt in (first, second):
        attrs = attempt["attributes"]
        assert attrs["jobd.queue"] == "default" and attrs["jobd.kind"] == "traced.flaky"
        assert attrs["jobd.job_id"] == by_socket and attrs["jobd.wait_ms"] >= 0
    assert [a["attributes"]["jobd.attempt"] for a in (first, second)] == [1, 2]
    # `get` shows the failed attempt's span in its error.
    [error] = client.get(by_socket).errors
    assert (error.trace_id, error.span_id) == (first["trace_id"], first["span_id"])
    wait_until(lambda: any(s["name"] == "jobd.step" for s in receiver.spans), "the step span")
    [step] = [s for s in receiver.spans if s["name"] == "jobd.step"]
    assert step["parent"] == second["span_id"] and step["attributes"]["jobd.step"] == "finish"
    # A handler's own span (the ordinary API, the process-wide provider) nests under it.
    user_spans = [s for s in receiver.spans if s["name"] == "user.span"]
    attempt_ids = {a["span_id"] for j in expected for a in receiver.attempts(j)}
    assert user_spans and all(s["parent"] in attempt_ids | {alone["span_id"]}
                              for s in user_spans)
    resource = first["resource"]
    assert resource["service.name"] == "jobd-e2e" and resource["jobd.region"] == "eu-west"
    assert first["path"] == "/v1/traces" and first["content_type"] == "application/x-protobuf"
    # The stored context is what `get` reads back from Postgres.
    assert sql.fetchval("SELECT traceparent FROM jobd.jobs WHERE id = $1", by_sql) == \
        producer("5555555555555555")


BAD = [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",       # no flags
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",    # upper case
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",    # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",    # zero span id
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    # another version
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\x00",  # a NUL
    "x" * 100_000,                                               # too large
]


def test_a_bad_traceparent_is_a_typed_error_on_every_surface(traced_daemon, fresh_database):
    client = SyncClient(str(traced_daemon.socket))
    for bad in BAD:
        with pytest.raises(JobdError) as refused:
            client.enqueue("traced.user", {}, traceparent=bad)
        assert refused.value.code == "bad_request", bad
        assert "traceparent" in refused.value.message, refused.value.message
        status, reply = post(traced_daemon.base, "/v1/enqueue",
                             {"job": {"kind": "traced.user", "traceparent": bad}})
        assert (status, reply["code"]) == (400, "bad_request"), bad
    with pytest.raises(JobdError) as wrong_type:
        client.enqueue("traced.user", {}, traceparent=42)
    assert wrong_type.value.code == "bad_request"
    for bad in (BAD[0], BAD[1], BAD[4], "x" * 1000):
        status, reply = post(traced_daemon.base, "/v1/enqueue", {"job": {"kind": "traced.user"}},
                             {"traceparent": bad})
        assert (status, reply["code"]) == (400, "bad_request"), bad
        assert reply["details"] == {"header": "traceparent"}
    for bad in BAD[:5]:
        with pytest.raises(asyncpg.InvalidParameterValueError, match="traceparent"):
            sql_enqueue(fresh_database, "traced.user", bad)
    # A direct INSERT meets the column's CHECK.
    async def insert() -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            await conn.execute("INSERT INTO jobd.jobs (queue, kind, traceparent) "
                               "VALUES ('default', 'traced.user', 'nope')")
        finally:
            await conn.close()
    with pytest.raises(asyncpg.CheckViolationError):
        run_async(insert)
    # Nothing was stored, and the daemon goes on.
    assert client.enqueue("traced.user", {}).id > 0
    assert client.ping() is not None


def test_an_endpoint_that_refuses_connections_costs_jobs_nothing(jobd, sql):
    closed = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens there
    daemon = jobd(modules=["tests.e2e.tracing_handlers"], extra_toml=tracing_toml(closed))
    client = SyncClient(str(daemon.socket))
    ids = [client.enqueue("traced.flaky", {}, traceparent=producer("00f067aa0ba902b7")).id
           for _ in range(20)]
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state = 'completed' "
                                    "AND id = ANY($1::bigint[])", ids) == len(ids),
               "every job completed", timeout=60)
    assert client.ping() is not None
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    # The flush at exit is bounded (daemon/tracing.py FLUSH_TIMEOUT_S), not the export's retries.
    assert time.monotonic() - began < 30


def test_a_drain_flushes_the_spans_still_queued(jobd, receiver, sql):
    daemon = jobd(modules=["tests.e2e.tracing_handlers"],
                  extra_toml=tracing_toml(receiver.endpoint))
    client = SyncClient(str(daemon.socket))
    job_id = client.enqueue("traced.user", {}).id
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)
               == "completed", "the job completed")
    # The batch processor sends every 5 s; the drain must not wait for that, nor lose them.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    assert receiver.attempts(job_id), receiver.spans


def test_a_killed_daemons_job_keeps_its_producer_as_parent(jobd, receiver, sql):
    options = dict(modules=["tests.e2e.tracing_handlers"], jobs={"lease": "2s", "reaper_interval": "500ms"},
                   extra_toml=tracing_toml(receiver.endpoint))
    first = jobd(**options)
    job_id = SyncClient(str(first.socket)).enqueue(
        "traced.hangs_first", {}, traceparent=producer("6666666666666666")).id
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)
               == "running", "the first attempt running")
    first.kill()  # SIGKILL: its attempt's span, never ended, is lost with it
    second = jobd(**options)
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)
               == "completed", "the rescued job completed", timeout=60, daemons=(second,))
    second.signal(signal.SIGTERM)
    assert second.wait(60) == 0
    [rescued] = receiver.attempts(job_id)
    assert rescued["attributes"]["jobd.attempt"] == 2
    assert rescued["attributes"]["jobd.outcome"] == "completed"
    # The parent came from Postgres, not from the dead daemon's memory.
    assert (rescued["trace_id"], rescued["parent"]) == (TRACE_ID, "6666666666666666")
    assert rescued["links"] == []  # the rescue's error names no span; no traced failure before


def test_an_endpoint_that_accepts_and_never_answers_costs_jobs_nothing(jobd, sql):
    # A listener whose backlog takes the connections and never reads them: every export
    # waits out its timeout.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}/v1/traces"
        daemon = jobd(modules=["tests.e2e.tracing_handlers"], extra_toml=tracing_toml(endpoint))
        client = SyncClient(str(daemon.socket))
        ids = [client.enqueue("traced.flaky", {}).id for _ in range(20)]
        wait_until(lambda: sql.fetchval(
            "SELECT count(*) FROM jobd.jobs WHERE state = 'completed' AND id = ANY($1::bigint[])",
            ids) == len(ids), "every job completed", timeout=60, daemons=(daemon,))
        assert client.ping() is not None
        began = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        # Bounded by the flush's 5 s (plus the drain), not by the hung export.
        assert time.monotonic() - began < 30
        events = {e.get("event") for e in daemon.log_events()}
        assert "tracing.flush_timeout" in events or "tracing.export_failed" in events, events
    finally:
        hung.close()
