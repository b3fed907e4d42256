"""HTTP handlers against a real `jobd run` and loopback endpoints started here: the
answers' mapping onto the retry table, key limits across two daemons, the 202 +
callback flow (also through a SIGKILL and on another daemon), the Node verifier."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.embedded import EmbeddedPostgres
from protocol.client import SyncClient
from protocol.jobs import JobSpec
from tests.e2e import http_endpoint
from tests.e2e.test_http_e2e import free_port, request, samples
from tests.support import JobdProcess

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 40.0

KINDS: dict[str, dict[str, Any]] = {
    "t.ok": {"path": "/ok"},
    "t.status": {"path": "/status", "key": "market", "max_attempts": 3},
    "t.slow": {"path": "/slow", "key": "market", "timeout": "10s"},
    "t.timeout": {"path": "/slow", "timeout": "1s", "max_attempts": 1},
    "t.big": {"path": "/big"},
    "t.nul": {"path": "/nul"},
    "t.garbage": {"path": "/garbage"},
    "t.refused": {"url": "http://127.0.0.1:9/closed", "max_attempts": 1},
    "t.callback": {"path": "/callback", "key": "/market", "callback_timeout": "60s"},
    "t.short": {"path": "/callback", "callback_timeout": "2s", "max_attempts": 1},
    "t.schema": {"path": "/ok", "args_schema": {
        "type": "object", "required": ["market"],
        "properties": {"market": {"type": "string"}}}},
}


def kinds_toml(base: str, secret: Path, kinds: dict[str, dict[str, Any]]) -> str:
    lines = []
    for kind, spec in kinds.items():
        lines.append(f'[http.kinds."{kind}"]')
        lines.append(f"url = {json.dumps(spec.get('url', base + spec.get('path', '')))}")
        lines.append('queue = "hooks"')
        lines.append(f"secret_file = {json.dumps(str(secret))}")
        for name in ("key", "timeout", "callback_timeout", "max_attempts"):
            if name in spec:
                lines.append(f"{name} = {json.dumps(spec[name])}")
        if "args_schema" in spec:
            lines.append(f"args_schema = {toml_inline(spec['args_schema'])}")
    return "\n".join(lines) + "\n"


def toml_inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_inline(v)}"
                                for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    return json.dumps(value)


@pytest.fixture
def endpoint():
    ep = http_endpoint.start()
    yield ep
    ep.close()


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "hooks.secret"
    path.write_text(http_endpoint.SECRET + "\n")
    return path


@pytest.fixture
def start(jobd, endpoint, secret):
    def start_one(kinds: dict[str, dict[str, Any]] | None = None,
                  key_concurrency: int = 2) -> Any:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        extra = (f'[http]\nallow_hosts = ["127.0.0.1"]\ncallback_url = "{base}"\n'
                 + kinds_toml(endpoint.base, secret, kinds or KINDS)
                 + "[limits]\nmax_result_bytes = 65536\n")
        proc = jobd(control={"http": f"127.0.0.1:{port}"}, extra_toml=extra,
                    queues={"hooks": {"concurrency": 20, "key_concurrency": key_concurrency,
                                      "rate_limit_pause": "1s"}},
                    jobs={"lease": "3s", "reaper_interval": "0.3s", "poll_interval": "0.3s"})
        proc.base = base
        return proc
    return start_one


def enqueue(daemon: Any, kind: str, args: dict[str, Any], **options: Any) -> int:
    return SyncClient(str(daemon.socket)).enqueue(kind, args, **options).id


def get(daemon: Any, job_id: int) -> dict[str, Any]:
    return daemon.jobctl_json("get", str(job_id))


def wait_state(daemon: Any, job_id: int, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        job = get(daemon, job_id)
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {states}: {job}")


def wait_for(predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def callback(daemon: Any, job_id: int, action: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, _, raw = request(daemon.base, "POST", f"/v1/jobs/{job_id}/{action}", body,
                             token=None)
    return status, json.loads(raw)


def errors(job: dict[str, Any]) -> list[str]:
    return [e["class"] for e in job["errors"]]


def test_success_is_signed_and_counted(start, endpoint):
    daemon = start()
    job_id = enqueue(daemon, "t.ok", {"market": "ebay", "n": 1})
    job = wait_state(daemon, job_id, "completed")
    assert job["result"] == {"echo": {"market": "ebay", "n": 1}, "attempt": 1}
    [seen] = endpoint.requests("/ok")
    assert seen.verified, seen.headers  # examples/webhook_verify.py accepts it
    assert seen.headers["webhook-id"] == f"job_{job_id}_1"
    body = seen.body
    assert body["id"] == job_id and body["kind"] == "t.ok" and body["queue"] == "hooks"
    assert body["attempt"] == 1 and body["max_attempts"] == 3 and body["errors"] == []
    assert body["deadline"] > time.time() - 5
    assert body["callback"]["url"] == f"{daemon.base}/v1/jobs/{job_id}"
    # The secret is nowhere a client or the log can see it.
    secret = http_endpoint.SECRET
    assert secret not in daemon.jobctl("get", str(job_id)).stdout
    assert secret not in daemon.log_text()
    assert "HTTP Request" not in daemon.log_text()  # httpx's line per request is silenced
    status, _, text = request(daemon.base, "GET", "/metrics", token=None)
    assert status == 200 and secret.encode() not in text
    counted = samples(text.decode(), "jobd_http_requests_total")
    assert ({"kind": "t.ok", "status_class": "2xx", "outcome": "completed"}, 1.0) in counted
    assert any(labels == {"kind": "t.ok"} and value == 1.0 for labels, value in
               samples(text.decode(), "jobd_http_request_seconds_count"))


def test_answers_map_onto_the_retry_table(start, endpoint, sql):
    daemon = start()
    five = enqueue(daemon, "t.status", {"market": "a", "status": 500, "times": 1})
    gateway = enqueue(daemon, "t.status", {"market": "b", "status": 408, "times": 1})
    bad = enqueue(daemon, "t.status", {"market": "c", "status": 400, "times": 1})
    gone = enqueue(daemon, "t.status", {"market": "d", "status": 404, "times": 1})
    slow = enqueue(daemon, "t.timeout", {"hold_s": 3})
    big = enqueue(daemon, "t.big", {"bytes": 100_000})
    nul = enqueue(daemon, "t.nul", {})
    garbage = enqueue(daemon, "t.garbage", {})
    refused = enqueue(daemon, "t.refused", {})
    assert errors(wait_state(daemon, bad, "failed")) == ["fail"]
    assert errors(wait_state(daemon, gone, "failed")) == ["fail"]
    assert get(daemon, bad)["attempt"] == 1
    timed_out = wait_state(daemon, slow, "failed")
    assert errors(timed_out)[0] in ("network", "timeout"), timed_out
    too_large = wait_state(daemon, big, "failed")
    assert errors(too_large) == ["result_too_large"]
    assert errors(wait_state(daemon, nul, "failed")) == ["invalid_value"]
    assert errors(wait_state(daemon, garbage, "failed")) == ["fail"]
    refused_job = wait_state(daemon, refused, "failed")
    assert errors(refused_job) == ["network"]  # connection refused
    assert "ConnectError: " in refused_job["errors"][0]["message"], refused_job["errors"]
    assert "1 s" in timed_out["errors"][0]["message"], timed_out["errors"]
    assert daemon.jobctl_json("ping")["ready"]  # none of it touched the daemon
    # 500 and 408 are network errors: retried with backoff (10 s base), then fine.
    sql.execute("UPDATE jobd.jobs SET run_at = now() WHERE id = ANY($1) AND state = 'scheduled'",
                [five, gateway])
    for job_id in (five, gateway):
        job = wait_state(daemon, job_id, "completed")
        assert errors(job) == ["network"] and job["attempt"] == 2, job


@pytest.mark.parametrize("retry_after", [2, None])
def test_rate_limit_pauses_the_key(start, endpoint, sql, retry_after):
    daemon = start()
    args: dict[str, Any] = {"market": "m", "status": 429, "times": 1}
    if retry_after is not None:
        args["retry_after"] = retry_after
    job_id = enqueue(daemon, "t.status", args)
    wait_for(lambda: endpoint.requests("/status"), "the first request")
    paused = wait_for(lambda: sql.fetchval(
        "SELECT extract(epoch FROM paused_until - now()) FROM jobd.flow_keys "
        "WHERE queue = 'hooks' AND key = 'm' AND paused_until > now()"), "the key's pause")
    assert paused > 0
    # Another job of the key waits out the pause too; one of another key does not.
    other_key = enqueue(daemon, "t.ok", {"market": "x"})
    same_key = enqueue(daemon, "t.status", {"market": "m", "status": 200, "times": 0})
    wait_state(daemon, other_key, "completed")
    if retry_after is None:
        # The key pauses for rate_limit_pause; the job itself retries on its own
        # rate-limit backoff (60 s base), brought forward here.
        wait_state(daemon, same_key, "completed")
        sql.execute("UPDATE jobd.jobs SET run_at = now() WHERE id = $1", job_id)
    job = wait_state(daemon, job_id, "completed")
    assert errors(job) == ["rate_limit"] and job["attempt"] == 2
    wait_state(daemon, same_key, "completed")
    first, *later = endpoint.requests("/status")
    pause_s = retry_after or 1.0  # the queue's rate_limit_pause without Retry-After
    assert all(s.at - first.at >= 0.8 * pause_s for s in later), [s.at - first.at for s in later]


def test_slow_endpoint_holds_key_concurrency_across_two_daemons(start, endpoint, sql):
    a, b = start(), start()
    client = SyncClient(str(a.socket))
    client.enqueue_batch([JobSpec(kind="t.slow", args={"market": "m", "hold_s": 0.4})
                          for _ in range(12)])
    wait_for(lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") == 12, "12 completed")
    assert endpoint.peak["m"] == 2  # key_concurrency = 2, shared by both daemons
    calls = []
    for daemon in (a, b):
        _, _, text = request(daemon.base, "GET", "/metrics", token=None)
        calls += [v for labels, v in samples(text.decode(), "jobd_http_requests_total")
                  if labels["kind"] == "t.slow" and labels["outcome"] == "completed"]
    assert sum(calls) == 12  # one request per job, whichever daemon made it


def token_of(endpoint: Any, job_id: int) -> str:
    seen = wait_for(lambda: [s for s in endpoint.requests("/callback")
                             if s.body["id"] == job_id], f"job {job_id}'s request")
    return seen[-1].body["callback"]["token"]


def test_callback_complete_fail_progress(start, endpoint, sql):
    daemon = start(key_concurrency=1)
    first = enqueue(daemon, "t.callback", {"market": "m"})
    token = token_of(endpoint, first)
    job = wait_for(lambda: (j := get(daemon, first))["callback_deadline"] and j, "detached")
    assert job["state"] == "running" and job["lease_owner"] is None
    assert "waiting for its HTTP callback" in daemon.jobctl("get", str(first)).stdout
    # The slot stays held: a second job of the key is not called meanwhile.
    second = enqueue(daemon, "t.callback", {"market": "m"})
    time.sleep(1.0)
    assert [s.body["id"] for s in endpoint.requests("/callback")] == [first]

    # Misuse: a wrong token, another job's id, bad fields, a NUL, a mismatched job_id.
    assert callback(daemon, first, "complete", {"token": "x" * 43})[0] == 401
    assert callback(daemon, first + 1000, "complete", {"token": token})[0] == 401
    assert callback(daemon, first, "progress", {"token": token, "pct": "half"})[0] == 400
    assert callback(daemon, first, "progress", {"token": token, "pct": 101})[0] == 400
    assert callback(daemon, first, "complete", {"token": token, "job_id": first + 1})[0] == 400
    status, _, _ = request(daemon.base, "POST", f"/v1/jobs/{first}/complete", None, token=None)
    assert status == 400  # no token at all
    status, _, _ = request(daemon.base, "GET", f"/v1/jobs/{first}/complete", token=None)
    assert status == 405
    assert get(daemon, first)["state"] == "running"

    before = get(daemon, first)["callback_deadline"]
    status, reply = callback(daemon, first, "progress", {"token": token, "pct": 40,
                                                         "note": "half\u0000way"})
    assert status == 400 and reply["code"] == "bad_request", reply
    status, reply = callback(daemon, first, "progress", {"token": token, "pct": 40,
                                                         "note": "halfway"})
    assert status == 200 and reply["result"]["state"] == "running", reply
    assert reply["result"]["deadline"] >= before
    assert get(daemon, first)["progress"] == 40
    status, reply = callback(daemon, first, "heartbeat", {"token": token})
    assert status == 200, reply
    status, reply = callback(daemon, first, "complete", {"token": token, "result": {"ok": 1}})
    assert status == 200 and reply["result"] == {"id": first, "state": "completed"}
    job = get(daemon, first)
    assert job["state"] == "completed" and job["result"] == {"ok": 1}
    status, reply = callback(daemon, first, "complete", {"token": token})
    assert status == 409, reply  # a duplicate: the job is finished

    # The freed slot lets the second job run; the app fails it for good.
    token2 = token_of(endpoint, second)
    wait_for(lambda: get(daemon, second)["callback_deadline"], "second detached")
    status, reply = callback(daemon, second, "fail", {"token": token2, "message": "no model"})
    assert status == 200 and reply["result"]["state"] == "failed", reply
    job = get(daemon, second)
    assert errors(job) == ["fail"] and "no model" in job["errors"][0]["message"]


def test_callback_timeout_frees_the_slot(start, endpoint):
    daemon = start()
    job_id = enqueue(daemon, "t.short", {})
    token = token_of(endpoint, job_id)
    job = wait_state(daemon, job_id, "failed")
    assert errors(job) == ["timeout"], job
    assert callback(daemon, job_id, "complete", {"token": token})[0] == 401  # token died


def test_callback_survives_sigkill_and_reaches_another_daemon(start, endpoint):
    a = start()
    job_id = enqueue(a, "t.callback", {"market": "k"})
    token = token_of(endpoint, job_id)
    wait_for(lambda: get(a, job_id)["callback_deadline"], "detached")
    a.kill()
    b = start()  # a restart does not call the endpoint again
    time.sleep(1.5)
    assert len(endpoint.requests("/callback")) == 1
    assert get(b, job_id)["state"] == "running"
    status, reply = callback(b, job_id, "complete", {"token": token, "result": [1, 2]})
    assert status == 200, reply
    assert get(b, job_id)["result"] == [1, 2]


def test_cancel_a_waiting_job(start, endpoint):
    daemon = start()
    job_id = enqueue(daemon, "t.callback", {"market": "c"})
    token = token_of(endpoint, job_id)
    wait_for(lambda: get(daemon, job_id)["callback_deadline"], "detached")
    reply = daemon.jobctl_json("cancel", str(job_id))
    assert reply["state"] == "cancelled", reply
    assert callback(daemon, job_id, "complete", {"token": token})[0] == 401


def test_args_schema_and_key_are_checked_at_enqueue(start):
    daemon = start()
    result = daemon.jobctl("enqueue", "t.schema", "--args", '{"market": 5}', check=False)
    assert result.returncode != 0 and "args_schema" in result.stderr, result.stderr
    assert "at `$.market`" in result.stderr, result.stderr
    result = daemon.jobctl("enqueue", "t.callback", "--args", '{"other": 1}', check=False)
    assert result.returncode != 0 and "flow-control key" in result.stderr, result.stderr
    result = daemon.jobctl("enqueue", "t.ok", "--args", '[1, 2]', check=False)
    assert result.returncode != 0, result.stdout  # args are a JSON object
    assert daemon.jobctl("enqueue", "t.schema", "--args", '{"market": "a"}').returncode == 0


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed (apt-get install -y nodejs; .ci/run does it as root)")
def test_node_snippet_verifies_jobd_requests(start, secret):
    server = subprocess.Popen(["node", str(ROOT / "examples/node/server.mjs"), "0",
                               http_endpoint.SECRET], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("listening "), line
        port = int(line.split()[1])
        daemon = start({"t.node": {"url": f"http://127.0.0.1:{port}/"}})
        job_id = enqueue(daemon, "t.node", {"hello": "node"})
        job = wait_state(daemon, job_id, "completed", "failed")
        assert job["result"] == {"verified": True, "job": job_id, "args": {"hello": "node"}}, job
        # A request it cannot verify is refused by the same snippet.
        status, _, _ = request(f"http://127.0.0.1:{port}", "POST", "/", {"id": 1}, token=None)
        assert status == 401
    finally:
        server.kill()
        server.wait(5)


def test_reload_refuses_a_bad_kind_and_applies_a_good_one(start, endpoint, secret):
    daemon = start({"t.ok": {"path": "/ok"}})
    original = daemon.config.read_text()
    daemon.config.write_text(original.replace(str(secret), str(secret) + ".missing"))
    result = daemon.jobctl("--json", "reload", check=False)
    reply = json.loads(result.stdout)
    assert reply["ok"] is False and "cannot read" in reply["message"], reply
    assert http_endpoint.SECRET not in result.stdout + daemon.log_text()
    wait_state(daemon, enqueue(daemon, "t.ok", {}), "completed")  # the running kinds stay

    daemon.config.write_text(original.replace('"t.ok"', '"t.new"'))
    assert daemon.jobctl_json("reload")["ok"] is True
    result = daemon.jobctl("enqueue", "t.ok", "--args", "{}", check=False)
    assert result.returncode != 0 and "unknown" in result.stderr, result.stderr
    job = wait_state(daemon, enqueue(daemon, "t.new", {"n": 2}), "completed")
    assert job["result"]["echo"] == {"n": 2}


def test_the_readme_shows_the_node_files_the_tests_run():
    readme = (ROOT / "README.md").read_text()
    for name in ("verify.mjs", "server.mjs"):
        text = (ROOT / "examples" / "node" / name).read_text().rstrip("\n")
        assert f"```js\n{text}\n```" in readme, name


def test_postgres_outage_during_a_callback_wait(endpoint, secret, tmp_path):
    """The wait lives in Postgres: a callback during the outage is `unavailable` (503),
    the same callback after it completes the job, and the endpoint is called once."""
    root = Path(tempfile.mkdtemp(prefix="jobd-t-"))  # not under tmp_path: see test_db_outage
    cluster = EmbeddedPostgres(root / "pg", fast=True)
    cluster.start()
    daemon = None
    try:
        url = cluster.create_database("jobd_http_outage")
        port = free_port()
        extra = (f'[http]\nallow_hosts = ["127.0.0.1"]\ncallback_url = "http://127.0.0.1:{port}"\n'
                 + kinds_toml(endpoint.base, secret, {"t.callback": KINDS["t.callback"]}))
        daemon = JobdProcess(tmp_path / "d", url, control={"http": f"127.0.0.1:{port}"},
                             extra_toml=extra, queues={"hooks": {"key_concurrency": 1}},
                             jobs={"lease": "3s"}, daemon={"heartbeat": "0.5s"})
        daemon.start()
        daemon.base = f"http://127.0.0.1:{port}"
        job_id = enqueue(daemon, "t.callback", {"market": "m"})
        token = token_of(endpoint, job_id)
        wait_for(lambda: get(daemon, job_id)["callback_deadline"], "detached")

        cluster.stop()
        status, reply = callback(daemon, job_id, "complete", {"token": token, "result": 1})
        assert status == 503 and reply["code"] == "unavailable", reply
        cluster.start()
        wait_for(lambda: daemon.jobctl_json("ping")["ready"], "ready again")
        status, reply = callback(daemon, job_id, "complete", {"token": token, "result": 1})
        assert status == 200, reply
        assert get(daemon, job_id)["result"] == 1
        assert len(endpoint.requests("/callback")) == 1
        assert daemon.proc.poll() is None
    finally:
        if daemon is not None:
            daemon.kill()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_cancel_while_the_request_is_in_flight(start, endpoint):
    daemon = start()
    job_id = enqueue(daemon, "t.slow", {"market": "z", "hold_s": 5})
    wait_for(lambda: endpoint.requests("/slow"), "the request")
    daemon.jobctl("cancel", str(job_id))
    job = wait_state(daemon, job_id, "cancelled")
    assert errors(job) == ["cancelled"], job
    _, _, text = request(daemon.base, "GET", "/metrics", token=None)
    assert ({"kind": "t.slow", "status_class": "none", "outcome": "cancelled"}, 1.0) in \
        samples(text.decode(), "jobd_http_requests_total")
