"""`jobctl` against a real daemon: durations in --delay, `top` on a terminal, error lines."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from datetime import datetime

import pytest

from daemon.jobctl import parser
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
