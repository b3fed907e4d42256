"""`jobctl`: its arguments, what each subcommand sends and prints (against a stand-in
client), its exit statuses and error lines; and against a real daemon, durations in
--delay, `top` on a terminal, error lines."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.jobctl import main
from daemon.jobctl.cli import parser
from daemon.jobctl.commands import run
from daemon.jobctl.render import render_list, render_tree
from protocol import commands as c
from protocol.errors import NotFound
from protocol.jobs import JobView
from protocol.tree import TreeNode
from tests.support import ROOT, JobdProcess


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("2h", 7200),
                                                ("45", 45), ("1.5", 1.5), ("500ms", 0.5)])
def test_delay_takes_duration_units(text: str, seconds: float) -> None:
    assert parser().parse_args(["enqueue", "noop", "--delay", text]).delay == seconds


def test_delay_refuses_a_non_duration(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["enqueue", "noop", "--delay", "soon"])
    assert exit_.value.code == 2
    assert "not a duration: 'soon'" in capsys.readouterr().err


class StandIn:
    """A SyncClient stand-in: records each command and answers from `answers` by type."""

    def __init__(self, **answers: Any) -> None:
        self.sent: list[c.Command] = []
        self.answers = answers

    def call(self, cmd: c.Command) -> Any:
        self.sent.append(cmd)
        answer = self.answers[type(cmd).__name__]
        if isinstance(answer, Exception):
            raise answer
        return answer


def jobctl(client: StandIn, *argv: str) -> int:
    return run(parser().parse_args(list(argv)), client)  # type: ignore[arg-type]


def job_view(job_id: int, **fields: Any) -> JobView:
    now = datetime(2025, 10, 14, 6, 0, tzinfo=UTC)
    base: dict[str, Any] = dict(
        id=job_id, kind="noop", queue="default", key=None, args={}, state="completed",
        attempt=1, max_attempts=3, priority=0, unique_key=None, tags=[], progress=None,
        progress_note=None, result=None, errors=[], run_at=now, created_at=now,
        started_at=None, finished_at=None, lease_owner=None, cancel_requested=False)
    return JobView(**{**base, **fields})


def test_cancel_of_one_id_is_a_cancel_and_with_filters_a_bulk_cancel(capsys) -> None:
    client = StandIn(Cancel=c.CancelResult(id=5, was="available", state="cancelled"),
                     CancelMany=c.BulkResult(matched=3, changed=2, dry_run=False))
    assert jobctl(client, "cancel", "5") == 0
    assert capsys.readouterr().out == "job 5: available -> cancelled\n"
    assert jobctl(client, "cancel", "--kind", "sleep", "--state", "available") == 0
    assert capsys.readouterr().out == "2 of 3 matching jobs cancelled\n"
    single, bulk = client.sent
    assert single == c.Cancel(job_id=5)
    assert isinstance(bulk, c.CancelMany)
    assert (bulk.kind, bulk.state, bulk.dry_run) == ("sleep", ["available"], False)


def test_json_prints_the_result_struct_as_sent(capsys) -> None:
    result = c.BulkResult(matched=4, changed=0, dry_run=True)
    assert jobctl(StandIn(Retry=result), "retry", "--state", "failed", "--dry-run", "--json") == 0
    assert msgspec.json.decode(capsys.readouterr().out, type=c.BulkResult) == result
    # --json before the subcommand works the same.
    pong = c.Pong(daemon_id="d1", region="eu", version="0.1.0", ready=True, draining=False)
    assert jobctl(StandIn(Ping=pong), "--json", "ping") == 0
    assert msgspec.json.decode(capsys.readouterr().out, type=c.Pong) == pong


def test_enqueue_prints_the_id_and_sends_the_options() -> None:
    client = StandIn(Enqueue=c.EnqueueResult(id=42, created=True))
    assert jobctl(client, "enqueue", "noop", "--args", '{"n": 1}', "--queue", "q",
                  "--key", "ebay", "--delay", "2m", "--tag", "a", "--tag", "b") == 0
    [sent] = client.sent
    assert isinstance(sent, c.Enqueue)
    spec = sent.job
    assert (spec.kind, spec.args, spec.queue, spec.key, spec.delay_s, spec.tags) == \
        ("noop", {"n": 1}, "q", "ebay", 120.0, ["a", "b"])


def test_enqueue_from_a_file_sends_batches(tmp_path: Path, capsys) -> None:
    path = tmp_path / "args.jsonl"
    path.write_text('{"n": 1}\n\n{"n": 2}\n')
    client = StandIn(EnqueueBatch=c.BatchResult(ids=[1, 2], created=1))
    assert jobctl(client, "enqueue", "noop", "--args-file", str(path)) == 0
    [batch] = client.sent
    assert isinstance(batch, c.EnqueueBatch)
    assert [j.args for j in batch.jobs] == [{"n": 1}, {"n": 2}]
    assert capsys.readouterr().out == "enqueued 1 jobs (1 already queued under their unique key)\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["enqueue", "noop", "--args", "[1]"], "jobctl: args must be a JSON object\n"),
    (["enqueue", "noop", "--args", "{"], "jobctl: args are not JSON: "),
    (["send-event", "approved", "--data", "7"], "jobctl: args must be a JSON object\n"),
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str, tmp_path: Path,
                                           capsys) -> None:
    # Refused before anything is sent: the socket does not exist.
    assert main(["--socket", str(tmp_path / "none.sock"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_a_line_of_an_args_file_that_is_not_json_is_named(tmp_path: Path, capsys) -> None:
    path = tmp_path / "args.jsonl"
    path.write_text('{"n": 1}\nnope\n')
    assert main(["--socket", str(tmp_path / "none.sock"), "enqueue", "noop",
                 "--args-file", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"jobctl: {path}:2: args are not JSON: ")


def test_usage_errors_exit_2(capsys) -> None:
    for argv in (["nosuchcommand"], ["get"], ["get", "x"], ["enqueue", "noop", "--args", "{}",
                                                            "--args-file", "f"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        assert "usage: jobctl" in capsys.readouterr().err


def test_an_unreachable_daemon_is_exit_1_and_with_json_the_error_envelope(tmp_path: Path,
                                                                          capsys) -> None:
    socket = str(tmp_path / "none.sock")
    assert main(["--socket", socket, "--json", "ping"]) == 1
    error = msgspec.json.decode(capsys.readouterr().out)["error"]
    assert error["code"] == "unavailable"
    assert error["message"].startswith(f"cannot reach jobd at {socket}")
    assert main(["--socket", socket, "ping"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jobctl: unavailable: cannot reach jobd at ") and err.count("\n") == 1


def test_an_error_reply_keeps_its_code(monkeypatch, capsys) -> None:
    def refuse(self: Any, cmd: c.Command) -> Any:
        raise NotFound("job 9 not found", details={"job_id": 9})

    monkeypatch.setattr("protocol.client.SyncClient.call", refuse)
    assert main(["--json", "get", "9"]) == 1
    assert msgspec.json.decode(capsys.readouterr().out) == {
        "error": {"code": "not_found", "message": "job 9 not found", "details": {"job_id": 9}}}
    assert main(["get", "9"]) == 1
    assert capsys.readouterr().err == "jobctl: not_found: job 9 not found\n"


def test_an_unexpected_exception_is_one_line_not_a_traceback(monkeypatch, capsys) -> None:
    def boom(self: Any, cmd: c.Command) -> Any:
        raise RuntimeError("surprise")

    monkeypatch.setattr("protocol.client.SyncClient.call", boom)
    assert main(["stats"]) == 1
    assert capsys.readouterr().err == "jobctl: internal: RuntimeError: surprise\n"


def test_the_tree_draws_nested_supervisors() -> None:
    tree = TreeNode(name="jobd", kind="supervisor", state="running", strategy="one_for_one",
                    children=[
                        TreeNode(name="pools", kind="supervisor", state="running",
                                 strategy="one_for_all", restarts=2, children=[
                                     TreeNode(name="default", kind="actor", state="running")]),
                        TreeNode(name="heart", kind="actor", state="restarting", restarts=1)])
    assert render_tree(tree) == [
        "jobd [one_for_one] running",
        "├── pools [one_for_all] running, 2 restarts",
        "│   └── default running",
        "└── heart restarting, 1 restarts",
    ]


def test_a_listing_says_how_to_get_the_next_page() -> None:
    page = c.JobsPage(jobs=[job_view(7, state="failed", attempt=3)], next_cursor=7)
    lines = render_list(page).splitlines()
    assert lines[0].split() == ["id", "kind", "queue", "state", "attempt", "created"]
    assert lines[1].split() == ["7", "noop", "default", "failed", "3", "2025-10-14", "06:00:00"]
    assert lines[2] == "more: --cursor 7"


def test_enqueue_with_a_delay_in_minutes(jobd) -> None:
    daemon: JobdProcess = jobd()
    job = daemon.jobctl_json("enqueue", "noop", "--delay", "5m")
    assert job["state"] == "scheduled"
    run_at = datetime.fromisoformat(job["run_at"])
    created = datetime.fromisoformat(job["created_at"])
    assert 290 < (run_at - created).total_seconds() < 310


def _top_on_a_terminal(daemon: JobdProcess) -> tuple[int, int]:
    """Starts `jobctl top` on a new pty; returns (pid, pty fd) once a frame is drawn."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "daemon.jobctl", "--socket",
                                   str(daemon.socket), "top", "--interval", "0.2"], daemon.env)
    _expect(fd, b"q or Ctrl-C to quit")
    return pid, fd


def _expect(fd: int, marker: bytes, timeout: float = 30.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} not in {seen[-2000:]!r}"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child has gone
                chunk = b""
            assert chunk, f"jobctl top ended before {marker!r}: {seen[-2000:]!r}"
            seen += chunk
    return seen


def _exit_status(pid: int, fd: int, timeout: float = 30.0) -> tuple[int, bytes]:
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        readable, _, _ = select.select([fd], [], [], 0.05)
        if readable:
            try:
                output += os.read(fd, 65536)
            except OSError:
                pass
        if done:
            os.close(fd)
            return os.waitstatus_to_exitcode(status), output
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    raise AssertionError(f"jobctl top did not exit: {output[-2000:]!r}")


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_quits_on_q_and_ctrl_c(jobd, key: bytes) -> None:
    daemon: JobdProcess = jobd()
    pid, fd = _top_on_a_terminal(daemon)
    os.write(fd, key)  # \x03 on a terminal is Ctrl-C: SIGINT to jobctl
    code, output = _exit_status(pid, fd)
    assert code == 0, output[-2000:]
    assert b"Traceback" not in output


def test_jobctl_errors_are_one_line(jobd, tmp_path) -> None:
    daemon: JobdProcess = jobd()
    result = daemon.jobctl("get", "999999", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("jobctl: not_found: ") and result.stderr.count("\n") == 1
    result = JobdProcess(tmp_path / "nobody", "postgresql://unused").jobctl("ping", check=False)
    assert result.returncode == 1, result
    assert result.stderr.startswith("jobctl: unavailable: cannot reach jobd at ")
    assert result.stderr.count("\n") == 1
