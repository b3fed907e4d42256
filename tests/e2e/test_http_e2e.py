"""The HTTP surface of a real `jobd run`: health, readiness, metrics, the /v1 API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "e2e-token-0123456789"
DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base: str, method: str, path: str, body: Any = None,
            token: str | None = TOKEN) -> tuple[int, Any, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


@pytest.fixture
def daemon(jobd, tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = jobd(control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)},
                extra_toml='[metrics]\nleader_interval = "200ms"\n')
    proc.base = f"http://127.0.0.1:{port}"
    return proc


def wait_for(predicate, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_health_api_and_metrics(daemon):
    base = daemon.base
    assert request(base, "GET", "/healthz", token=None)[0] == 200
    status, _, body = request(base, "GET", "/readyz", token=None)
    assert (status, json.loads(body)) == (200, {"status": "ready"})

    # The API wants the token; health and metrics do not.
    job = {"job": {"kind": "noop"}}
    status, headers, body = request(base, "POST", "/v1/enqueue", job, token=None)
    assert status == 401 and json.loads(body)["code"] == "unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert request(base, "POST", "/v1/enqueue", job, token="wrong")[0] == 401

    status, _, body = request(base, "POST", "/v1/enqueue", job)
    assert status == 200
    reply = json.loads(body)
    assert reply["type"] == "ok" and reply["result"]["created"] is True
    job_id = reply["result"]["id"]

    def completed() -> dict[str, Any] | None:
        status, _, body = request(base, "GET", f"/v1/jobs/{job_id}")
        assert status == 200
        view = json.loads(body)["result"]
        return view if view["state"] == "completed" else None

    view = wait_for(completed, "the job to complete")
    assert view["id"] == job_id and view["kind"] == "noop"
    status, _, body = request(base, "GET", "/v1/jobs/999999999")
    assert status == 404 and json.loads(body)["code"] == "not_found"
    status, _, body = request(base, "POST", "/v1/enqueue", {"job": {"kind": "no.such.kind"}})
    assert status == 422 and json.loads(body)["code"] == "unknown_kind"

    def scraped() -> str | None:
        status, headers, body = request(base, "GET", "/metrics", token=None)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        gauges = samples(text, "jobd_queue_jobs")
        done = any(labels == {"queue": "default", "state": "completed"} and value >= 1
                   for labels, value in gauges)
        return text if done else None

    text = wait_for(scraped, "the queue gauges to count the completed job")
    finished = samples(text, "jobd_jobs_finished_total")
    assert any(labels == {"queue": "default", "kind": "noop", "outcome": "completed"}
               and value >= 1 for labels, value in finished)
    enqueued = samples(text, "jobd_jobs_enqueued_total")
    assert ({"queue": "default", "kind": "noop"}, 1.0) in enqueued
    [(info, one)] = samples(text, "jobd_daemon_info")
    assert one == 1 and info["region"] == "test" and info["daemon_id"]
    assert samples(text, "jobd_daemon_ready") == [({}, 1.0)]
    assert samples(text, "jobd_metrics_leader") == [({}, 1.0)]
    assert any(labels["actor"] == "completer" for labels, _ in samples(text, "jobd_mailbox_messages"))


def test_openapi_lists_every_command(daemon):
    status, _, body = request(daemon.base, "GET", "/v1/openapi.json")
    assert status == 200
    doc = json.loads(body)
    stats = json.loads(request(daemon.base, "POST", "/v1/hello", {"protocol": 1})[2])
    for name in stats["result"]["commands"]:
        assert f"/v1/{name}" in doc["paths"]
    assert "/v1/jobs/{id}" in doc["paths"]


def test_readyz_is_503_while_draining(daemon):
    status, _, body = request(daemon.base, "POST", "/v1/drain", {})
    assert status == 200
    status, _, body = request(daemon.base, "GET", "/readyz", token=None)
    assert (status, json.loads(body)) == (503, {"status": "not_ready", "reason": "draining"})
    request(daemon.base, "POST", "/v1/drain", {"undo": True})
    assert request(daemon.base, "GET", "/readyz", token=None)[0] == 200


def test_api_off_without_a_token(jobd):
    port = free_port()
    proc = jobd(control={"http": f"127.0.0.1:{port}"})
    base = f"http://127.0.0.1:{port}"
    status, _, body = request(base, "POST", "/v1/ping", {})
    assert status == 403 and "no token configured" in json.loads(body)["message"]
    assert request(base, "GET", "/metrics", token=None)[0] == 200
    assert proc.proc is not None and proc.proc.poll() is None


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (apt-get install --no-install-recommends "
                           "prometheus; .ci/run installs it)")
def test_promtool_checks_a_live_scrape(daemon):
    request(daemon.base, "POST", "/v1/enqueue", {"job": {"kind": "noop"}})
    wait_for(lambda: b"jobd_queue_jobs{" in request(daemon.base, "GET", "/metrics", token=None)[2],
             "the queue gauges")
    body = request(daemon.base, "GET", "/metrics", token=None)[2]
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
