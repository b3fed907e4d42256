"""A second `jobd run` on a state directory (or a socket) already in use is refused,
and the first daemon is left exactly as it was: answering, its socket file in place, its
embedded Postgres running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from daemon.embedded import EmbeddedPostgres, EmbeddedPostgresError
from daemon.main import EX_TEMPFAIL
from tests.support import ROOT, JobdProcess

DEADLINE_S = 60.0


def _run_second(config: Path, state: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`jobd run` in the foreground; a refused one exits at once (a daemon would not)."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.main", "run", "--config", str(config),
         "--state-dir", str(state)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S,
    )


def _assert_refused(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == EX_TEMPFAIL, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("jobd: another jobd (pid ") and what in lines[0], lines[0]
    assert "refusing" in lines[0]


def _assert_untouched(daemon: JobdProcess) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()[-3000:]
    assert daemon.socket.is_socket()
    assert daemon.jobctl_json("ping")["ready"] is True
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    daemon.jobctl("watch", str(job_id))  # returns once the job has finished
    assert daemon.jobctl_json("get", str(job_id))["state"] == "completed"


def test_second_daemon_on_the_same_state_dir_is_refused_embedded() -> None:
    # No database url: the first daemon runs the embedded Postgres in its state dir. A
    # private mkdtemp() directory, not tmp_path: a concurrent pytest session resets
    # /tmp/pytest-of-<user> to 0700, locking the server user out (see test_lifecycle).
    root = Path(tempfile.mkdtemp(prefix="jobd-lock-"))
    first = JobdProcess(root / "d", "", database=False)
    state = first.directory / "state"
    cluster = EmbeddedPostgres(state)
    try:
        first.start()
        postmaster = cluster.pid
        assert postmaster is not None

        result = _run_second(first.config, state, first.env)
        _assert_refused(result, f"state directory {state}")

        assert cluster.pid == postmaster  # not stopped, not restarted
        _assert_untouched(first)
        first.signal(signal.SIGTERM)
        assert first.wait(DEADLINE_S) == 0, first.log_text()[-3000:]
        assert cluster.pid is None  # the owner stops it on its way out
    finally:
        first.kill()
        leftover = cluster.pid  # only if the test failed with the daemon killed
        if leftover is not None:
            try:
                cluster.stop()
            except EmbeddedPostgresError:
                os.kill(leftover, signal.SIGINT)
        shutil.rmtree(root, ignore_errors=True)


def test_second_daemon_on_the_same_socket_is_refused(jobd, fresh_database: str,
                                                     tmp_path: Path) -> None:
    # Configured database, different state dirs, one socket path.
    first = jobd()
    other = JobdProcess(tmp_path / "other", fresh_database)
    other.config.write_text(other.config.read_text().replace(str(other.socket), str(first.socket)))
    assert str(first.socket) in other.config.read_text()

    result = _run_second(other.config, other.directory / "state", other.env)
    _assert_refused(result, f"control socket {first.socket}")
    _assert_untouched(first)

    # The refused one never reached the database.
    nodes = first.jobctl_json("nodes")
    assert len(nodes["daemons"]) == 1, nodes


def test_a_killed_daemon_leaves_no_stale_lock(jobd) -> None:
    first = jobd()
    first.kill()  # SIGKILL: no cleanup ran; the kernel dropped the locks
    first.start()
    assert first.jobctl_json("ping")["ready"] is True
