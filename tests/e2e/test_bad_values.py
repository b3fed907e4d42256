"""A real daemon given bad values on every surface (socket, jobctl, SQL): each one is a
typed error naming the field, nothing reaches the actors, and the daemon goes on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from daemon.config import EX_CONFIG
from protocol.jobs import JOB_STATES
from tests.protocol.test_jobs_limits import BAD, NUL_FIELDS
from tests.support import ROOT, wait_until


class RawClient:
    """NDJSON over the control socket, one request at a time, no client library."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buffer = b""
        assert self.call({"type": "hello", "protocol": 1})["type"] == "ok"

    def call(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        line = request if isinstance(request, bytes) else json.dumps(request).encode()
        self.sock.sendall(line + b"\n")
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "connection closed"
            self.buffer += chunk
        reply, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(reply)

    def close(self) -> None:
        self.sock.close()


def test_every_bad_field_is_a_typed_error_and_the_daemon_survives(jobd, sql):
    daemon = jobd(extra_toml="[limits]\nmax_args_bytes = 4096\n")
    client = RawClient(daemon.socket)
    try:
        for i, (request, path) in enumerate(BAD + NUL_FIELDS):
            raw = json.dumps({**request, "id": i}).replace('"RAW:1e400"', "1e400").encode()
            if request["type"] == "ping":  # its bad field is the id itself
                raw = json.dumps(request).encode()
            reply = client.call(raw)
            assert reply["type"] == "error", (request, reply)
            assert reply["code"] == "bad_request", (request, reply)
            assert f"at `{path}`" in reply["message"], (request, reply)
        # Values only the finished row can break (the handler's declaration, a key
        # function) or only the store knows (the size limit) are typed errors too.
        too_big = client.call({"type": "enqueue", "job": {"kind": "effect",
                                                          "args": {"name": "y" * 5000}}})
        assert too_big["code"] == "too_large", too_big
        assert "4096" in too_big["message"] and too_big["details"]["limit"] == 4096
        unknown = client.call({"type": "enqueue", "job": {"kind": "sleep",
                                                          "args": {"seconds": 0, "x": 1}}})
        assert unknown["code"] == "invalid_args" and "`x`" in unknown["message"]
        nul = client.call({"type": "enqueue", "job": {"kind": "effect",
                                                      "args": {"name": "\u0000"}}})
        assert nul["code"] == "invalid_args", nul
        state = client.call({"type": "list", "state": ["nosuchstate"]})
        assert all(s in state["message"] for s in JOB_STATES)
        assert client.call({"type": "ping"})["type"] == "ok"
    finally:
        client.close()
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 0
    # The daemon is still the same process, and works.
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)
               == "completed", daemons=(daemon,))
    assert not any(e.get("event") == "control.crashed" for e in daemon.log_events())


def test_jobctl_typos_are_refused_or_warned(jobd, sql):
    daemon = jobd()
    misspelled = daemon.jobctl("enqueue", "sleep", "--args", '{"secnds": 3}', check=False)
    assert misspelled.returncode == 1
    assert "invalid_args" in misspelled.stderr and "secnds" in misspelled.stderr

    typo = daemon.jobctl("enqueue", "noop", "--queue", "nosuchqueue")
    job_id = int(typo.stdout)
    assert "warning: no live daemon serves queue 'nosuchqueue'" in typo.stderr
    served = daemon.jobctl("enqueue", "noop")
    assert served.stderr == ""
    as_json = json.loads(daemon.jobctl("--json", "enqueue", "noop", "--queue", "q2").stdout)
    assert as_json["queue"] == "q2"  # --json stdout stays one JSON document

    paused = daemon.jobctl("pause", "nosuchqueue", check=False)
    assert paused.returncode == 1 and "not_found" in paused.stderr
    assert sql.fetchval("SELECT count(*) FROM jobd.pauses") == 0

    states = daemon.jobctl("list", "--state", "nosuchstate", check=False)
    assert states.returncode == 1 and "bad_request" in states.stderr
    assert all(s in states.stderr for s in JOB_STATES)

    for option in (["--timeout-s", "1e308"], ["--key", "k" * 600], ["--priority", "99999"],
                   ["--max-attempts", "0"], ["--delay", "999999999999"]):
        refused = daemon.jobctl("enqueue", "noop", *option, check=False)
        assert refused.returncode == 1 and "bad_request" in refused.stderr, (option, refused)
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id) == "available"
    daemon.jobctl("ping")


def test_sql_enqueue_refuses_bad_values_and_a_stored_misspelling_fails_its_job(
        jobd, sql, fresh_database):
    daemon = jobd()
    for call in ("jobd.enqueue('sleep', timeout_s => 'NaN')",
                 "jobd.enqueue('sleep', timeout_s => 'Infinity')",
                 "jobd.enqueue('sleep', timeout_s => 1e16)",
                 "jobd.enqueue('sleep', run_at => '-infinity')"):
        with pytest.raises(asyncpg.InvalidParameterValueError):
            sql.fetchval(f"SELECT {call}")
    with pytest.raises(asyncpg.CheckViolationError):
        sql.execute("INSERT INTO jobd.jobs (kind, timeout_s) VALUES ('sleep', 'NaN')")
    with pytest.raises(asyncpg.ProgramLimitExceededError):
        sql.fetchval("SELECT jobd.enqueue('noop', args => jsonb_build_object('x', "
                     "repeat('y', 1100000)))")
    # The daemon wrote its limits and queues at start.
    assert sql.fetchval("SELECT value FROM jobd.settings WHERE name = 'max_args_bytes'") \
        == str(1 << 20)
    assert "default" in sql.fetchval("SELECT queues FROM jobd.daemons")

    job_id = sql.fetchval("""SELECT jobd.enqueue('sleep', '{"secnds": 3}')""")
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)
               == "failed", daemons=(daemon,))
    [error] = msgspec.json.decode(
        sql.fetchval("SELECT errors::text FROM jobd.jobs WHERE id = $1", job_id))
    assert "unknown field `secnds`" in error["message"]
    daemon.jobctl("ping")


def test_list_views_leave_a_big_result_out(jobd, sql):
    daemon = jobd()
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)
               == "completed", daemons=(daemon,))
    sql.execute("UPDATE jobd.jobs SET result = jsonb_build_object('page', repeat('r', 2500000))"
                " WHERE id = $1", job_id)
    page = daemon.jobctl_json("list")
    [view] = page["jobs"]
    assert view["result"] is None and view["truncated"] == ["result"]
    assert daemon.jobctl("list").returncode == 0
    daemon.jobctl("ping")


def _check_config(tmp_path: Path, modules: list[str]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "jobd.toml"
    config.write_text(f'[handlers]\nmodules = {json.dumps(modules)}\npaths = ["."]\n')
    return subprocess.run([sys.executable, "-m", "daemon.main", "check-config", "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize(("module", "source", "reason"), [
    ("no_such_module_for_jobd", None, "ModuleNotFoundError"),
    ("broken_handlers", "raise RuntimeError('handler module\\nis broken')\n", "RuntimeError"),
    ("exiting_handlers", "raise SystemExit(3)\n", "SystemExit"),
])
def test_check_config_imports_the_handler_modules(tmp_path: Path, module: str,
                                                  source: str | None, reason: str):
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    result = _check_config(tmp_path, [module])
    assert result.returncode == EX_CONFIG, result
    [line] = result.stderr.splitlines()
    assert line.startswith("jobd: bad config: ") and module in line and reason in line
    assert _check_config(tmp_path, ["examples.basic"]).returncode == 0


def test_a_queue_a_reload_declares_can_be_paused_and_still_warns(jobd, sql):
    import signal

    daemon = jobd()
    assert sql.fetchval("SELECT queues FROM jobd.daemons") == ["default", "effects"]
    refused = daemon.jobctl("pause", "later", check=False)
    assert refused.returncode == 1 and "not_found" in refused.stderr
    daemon.config.write_text(daemon.config.read_text() + "[queues.later]\nconcurrency = 1\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "config.reloaded" in [e.get("event") for e in daemon.log_events()],
               "the reload", daemons=(daemon,))
    daemon.jobctl("pause", "later")  # declared now
    # ... but no dispatcher serves it until a restart, and the enqueue says so.
    assert "warning" in daemon.jobctl("enqueue", "noop", "--queue", "later").stderr


def test_deep_nesting_and_oversized_args_over_socket_and_http(jobd, tmp_path):
    import urllib.request

    from tests.e2e.test_http_e2e import TOKEN, free_port, request

    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN)
    port = free_port()
    daemon = jobd(control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)},
                  extra_toml="[limits]\nmax_args_bytes = 4096\n")
    base = f"http://127.0.0.1:{port}"
    deep = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    client = RawClient(daemon.socket)
    try:
        line = ('{"type": "enqueue", "job": {"kind": "noop", "args": ' + deep + "}}").encode()
        reply = client.call(line)
        assert reply["code"] == "bad_json" and "nested too deeply" in reply["message"], reply
        assert client.call({"type": "ping"})["type"] == "ok"
    finally:
        client.close()
    body = ('{"job": {"kind": "noop", "args": ' + deep + "}}").encode()
    req = urllib.request.Request(base + "/v1/enqueue", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400 and json.loads(exc.read())["code"] == "bad_json"
    status, _, raw = request(base, "POST", "/v1/enqueue",
                             {"job": {"kind": "effect", "args": {"name": "x" * 5000}}})
    assert status == 413 and json.loads(raw)["code"] == "too_large", raw
    status, _, raw = request(base, "POST", "/v1/enqueue",
                             {"job": {"kind": "noop", "timeout_s": 1e308}})
    assert status == 400 and "$.job.timeout_s" in json.loads(raw)["message"]
    daemon.jobctl("ping")
