"""`jobctl`: its arguments, what each subcommand sends and prints, its exit statuses and
error lines, durations in --delay, `top` on a terminal; against a real daemon wherever a
command reaches one."""

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
from daemon.jobctl.render import render_list, render_tree
from protocol import commands as c
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


def job_view(job_id: int, **fields: Any) -> JobView:
    now = datetime(2025, 10, 14, 6, 0, tzinfo=UTC)
    base: dict[str, Any] = dict(
        id=job_id, kind="noop", queue="default", key=None, args={}, state="completed",
        attempt=1, max_attempts=3, priority=0, unique_key=None, tags=[], progress=None,
        progress_note=None, result=None, errors=[], run_at=now, created_at=now,
        started_at=None, finished_at=None, lease_owner=None, cancel_requested=False)
    return JobView(**{**base, **fields})


def later(daemon: JobdProcess, *extra: str) -> int:
    """A noop job due in an hour (it stays `scheduled` while the test looks at it)."""
    return daemon.jobctl_json("enqueue", "noop", "--delay", "1h", *extra)["id"]


def test_cancel_of_one_id_is_a_cancel_and_with_filters_a_bulk_cancel(jobd) -> None:
    daemon: JobdProcess = jobd()
    first, second, third = (later(daemon, "--tag", "bulk") for _ in range(3))
    assert daemon.jobctl("cancel", str(first)).stdout == f"job {first}: scheduled -> cancelled\n"
    bulk = daemon.jobctl("cancel", "--kind", "noop", "--state", "scheduled", "--tag", "bulk")
    assert bulk.stdout == "2 of 2 matching jobs cancelled\n"
    assert [daemon.jobctl_json("get", str(i))["state"] for i in (first, second, third)] == \
        ["cancelled"] * 3


def test_json_prints_the_result_struct_as_sent(jobd) -> None:
    daemon: JobdProcess = jobd()
    out = daemon.jobctl("retry", "--state", "failed", "--dry-run", "--json").stdout
    assert msgspec.json.decode(out, type=c.BulkResult) == \
        c.BulkResult(matched=0, changed=0, dry_run=True)
    # --json before the subcommand works the same.
    pong = msgspec.json.decode(daemon.jobctl("--json", "ping").stdout, type=c.Pong)
    assert pong.ready is True and pong.draining is False


def test_enqueue_prints_the_id_and_sends_the_options(jobd) -> None:
    daemon: JobdProcess = jobd()
    done = daemon.jobctl("enqueue", "noop", "--args", "{}", "--queue", "q", "--key", "ebay",
                         "--delay", "2m", "--tag", "a", "--tag", "b")
    job_id = int(done.stdout)  # the id, alone on its line
    job = daemon.jobctl_json("get", str(job_id))
    assert (job["kind"], job["args"], job["queue"], job["key"], job["tags"], job["state"]) == \
        ("noop", {}, "q", "ebay", ["a", "b"], "scheduled")
    delay = datetime.fromisoformat(job["run_at"]) - datetime.fromisoformat(job["created_at"])
    assert 110 < delay.total_seconds() < 130


def test_enqueue_from_a_file_sends_batches(jobd, tmp_path: Path) -> None:
    daemon: JobdProcess = jobd()
    path = tmp_path / "args.jsonl"
    path.write_text('{}\n\n{}\n')
    done = daemon.jobctl("enqueue", "noop", "--args-file", str(path), "--delay", "1h",
                         "--tag", "from-file")
    assert done.stdout == "enqueued 2 jobs (0 already queued under their unique key)\n"
    listed = daemon.jobctl_json("list", "--tag", "from-file")
    assert len(listed["jobs"]) == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["enqueue", "noop", "--args", "[1]"], "jobctl: args must be a JSON object\n"),
    (["enqueue", "noop", "--args", "{"], "jobctl: args are not JSON: "),
    (["send-event", "approved", "--data", "7"], "jobctl: data must be a JSON object\n"),
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


def test_an_error_reply_keeps_its_code(jobd) -> None:
    daemon: JobdProcess = jobd()
    as_json = daemon.jobctl("--json", "get", "999999", check=False)
    assert as_json.returncode == 1
    error = msgspec.json.decode(as_json.stdout)["error"]
    assert (error["code"], error["details"]) == ("not_found", {"id": 999999})
    plain = daemon.jobctl("get", "999999", check=False)
    assert plain.returncode == 1
    assert plain.stderr == f"jobctl: not_found: {error['message']}\n"


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
