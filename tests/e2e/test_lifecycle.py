"""The daemon's life as systemd and an operator see it: READY, tree, reload, SIGTERM, exit codes.

Everything here runs the real `jobd run` process. No timing assertions: each wait polls
until a generous deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import EX_CONFIG
from daemon.embedded.pidfile import pid_alive
from tests.support import ROOT, JobdProcess, wait_until

DEADLINE_S = 60.0


# --------------------------------------------------------------------------- helpers


class NotifyListener:
    """A fake $NOTIFY_SOCKET: collects every datagram (as a list of lines) with its arrival time."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _, lines in self.messages for line in lines]

    def first(self, line: str, after: float = 0.0) -> float | None:
        """Arrival time of the first datagram holding `line` that arrived after `after`."""
        with self._lock:
            for at, lines in self.messages:
                if at >= after and line in lines:
                    return at
        return None

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def wait_for(self, line: str, after: float = 0.0, proc: JobdProcess | None = None,
                 timeout: float = DEADLINE_S) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.first(line, after)
            if at is not None:
                return at
            if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
                raise AssertionError(f"jobd exited with {proc.proc.returncode} before {line}:\n"
                                     f"{proc.log_text()}")
            time.sleep(0.02)
        raise AssertionError(f"no {line} within {timeout}s; got {self.lines()[-20:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def wait_completed(daemon: JobdProcess, job_id: int) -> dict:
    def done():
        job = daemon.jobctl_json("get", str(job_id))
        return job if job["state"] == "completed" else None

    return wait_until(done, f"job {job_id} to complete")


def postgres_processes_on(datadir: Path) -> list[int]:
    """Live (non-zombie) processes whose command line mentions `datadir`."""
    found = []
    needle = str(datadir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def tree_names(node: dict) -> dict[str, list[str]]:
    """{parent name: [child names]} for every supervisor in the JSON tree."""
    out = {node["name"]: [child["name"] for child in node["children"]]}
    for child in node["children"]:
        if child["children"]:
            out.update(tree_names(child))
    return out


@pytest.fixture
def processes() -> Iterator[list[JobdProcess]]:
    started: list[JobdProcess] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory outside pytest's basetemp for clusters that are (re)started mid-test.

    Every pytest session that starts resets /tmp/pytest-of-<user> to 0700, which locks the
    embedded server's user (`nobody` when running as root) out of a cluster under
    tmp_path until EmbeddedPostgres.start() re-adds o+x; a concurrent run in the same repo
    can do that right between the two. A private mkdtemp() directory is never touched.
    """
    path = Path(tempfile.mkdtemp(prefix="jobd-t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


# --------------------------------------------------------------------------- 1. the "Done means"


def _run_once(daemon: JobdProcess, notify: NotifyListener) -> tuple[float, int]:
    """Start, wait for READY=1, check the tree, SIGTERM; returns (seconds to READY, postmaster pid)."""
    t0 = time.monotonic()
    daemon.start(wait=False)
    ready_at = notify.wait_for("READY=1", after=t0, proc=daemon)
    to_ready = ready_at - t0
    daemon.wait_ready()

    # The embedded cluster lives in the state dir; remember its postmaster.
    pidfile = daemon.directory / "state" / "pg" / "data" / "postmaster.pid"
    assert pidfile.exists(), f"no embedded Postgres under the state dir:\n{daemon.log_text()}"
    postmaster = int(pidfile.read_text().splitlines()[0])
    assert pid_alive(postmaster)

    # Watchdog pings keep coming while the daemon runs (interval: half of WATCHDOG_USEC).
    pings = notify.count("WATCHDOG=1")
    wait_until(lambda: notify.count("WATCHDOG=1") >= pings + 2, "more WATCHDOG=1 pings")
    ready_lines = next(lines for at, lines in notify.messages if at == ready_at)
    assert f"MAINPID={daemon.proc.pid}" in ready_lines
    assert any(line.startswith("STATUS=ready") for line in ready_lines)

    # The supervisor tree, human and JSON.
    human = daemon.jobctl("tree").stdout
    for name in ("root", "completer", "progress", "heart", "reaper", "pools", "pool:default"):
        assert name in human, human
    tree = daemon.jobctl_json("tree")
    assert tree["name"] == "root" and tree["kind"] == "supervisor"
    names = tree_names(tree)
    assert names["root"] == ["writers", "heart", "reaper", "scheduler", "pools", "notifier",
                             "courier"]
    assert names["writers"] == ["completer", "progress"]
    assert "pool:default" in names["pools"]
    pools = next(child for child in tree["children"] if child["name"] == "pools")
    assert pools["kind"] == "supervisor"
    assert all(child["state"] == "running" for child in tree["children"]), tree

    # It works: a job runs to completion on the embedded database.
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    wait_completed(daemon, job_id)

    t_term = time.monotonic()
    daemon.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", after=t_term)
    assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()
    assert not pid_alive(postmaster), f"postmaster {postmaster} outlived jobd"
    assert postgres_processes_on(daemon.directory / "state" / "pg" / "data") == []
    assert not daemon.socket.exists()
    return to_ready, postmaster


def test_notify_ready_tree_sigterm(private_dir: Path, notify: NotifyListener,
                                   processes: list[JobdProcess]) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    daemon = JobdProcess(private_dir / "d", "", database=False, env=env)
    daemon.env.pop("WATCHDOG_PID", None)
    processes.append(daemon)
    assert not (daemon.directory / "state").exists()  # a fresh machine

    fresh_s, first_pm = _run_once(daemon, notify)
    # Same state dir again: the cluster exists, only start it.
    reused_s, second_pm = _run_once(daemon, notify)
    assert second_pm != first_pm or not pid_alive(first_pm)

    events = [e.get("event") for e in daemon.log_events()]
    assert events.count("embedded.started") == 2
    assert events.count("embedded.stopped") == 2
    print(f"\njobd start -> READY=1 with embedded Postgres: fresh state dir {fresh_s:.2f}s, "
          f"reused state dir {reused_s:.2f}s")


# --------------------------------------------------------------------------- 2. bad configs


def _jobd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `jobd` console script of this venv (falls back to `python -m daemon.main`)."""
    script = Path(sys.executable).parent / "jobd"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "daemon.main"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    environment.pop("JOBD_DATABASE_URL", None)
    environment.pop("JOBD_CONFIG", None)
    return subprocess.run([*cmd, *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=DEADLINE_S)


BAD_CONFIGS = {
    "unknown_key": ('[queues.x]\nconcurrency = 3\nbogus = 1\n', "$.queues.x", "bogus"),
    "unknown_section": ('[nonsense]\na = 1\n', "nonsense", None),
    "wrong_type": ('[queues.x]\nconcurrency = "ten"\n', "$.queues.x.concurrency", None),
    "out_of_range": ('[queues.x]\nconcurrency = 0\n', "$.queues.x.concurrency", None),
    "bad_duration": ('[jobs]\nlease = "3 fortnights"\n', "$.jobs.lease", None),
    "bad_queue_duration": ('[queues.x]\ntimeout = "soon"\n', "$.queues.x.timeout", None),
    "bad_retention": ('[jobs.retention]\nfailed_max_age = "-"\n',
                      "$.jobs.retention.failed_max_age", None),
    "bad_toml": ('region = \n', "jobd.toml", None),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_78(tmp_path: Path, case: str) -> None:
    text, path, word = BAD_CONFIGS[case]
    config = tmp_path / "jobd.toml"
    config.write_text(text)
    for command in (["run", "--state-dir", str(tmp_path / "state")], ["check-config"]):
        result = _jobd(*command, "--config", str(config))
        assert result.returncode == EX_CONFIG, (command, result.stdout, result.stderr)
        assert "bad config" in result.stderr
        assert path in result.stderr, result.stderr
        if word:
            assert word in result.stderr, result.stderr
    # `run` refused before touching anything: no embedded Postgres was started.
    assert not (tmp_path / "state" / "pg").exists()


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    result = _jobd("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == EX_CONFIG
    assert "no such file" in result.stderr


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    config = tmp_path / "jobd.toml"
    config.write_text(
        'region = "eu-west"\n'
        "[database]\npool_max = 4\ntimeout = 5\n"
        '[jobs]\nlease = "2m"\npoll_interval = 0.5\n'
        '[jobs.retention]\ncompleted_max_age = "1h"\n'
        '[queues.effects]\nconcurrency = 3\ntimeout = "10s"\n'
        '[handlers]\nmodules = ["examples.basic"]\n'
    )
    result = _jobd("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    # The shipped example is good too.
    example = ROOT / "examples" / "jobd.toml"
    if example.exists():
        result = _jobd("check-config", "--config", str(example))
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ["no_such_module_for_jobd", "broken_handlers"])
def test_unimportable_handler_module_exits_78(fresh_database: str, tmp_path: Path,
                                              processes: list[JobdProcess], module: str) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "broken_handlers.py").write_text("raise RuntimeError('handler module is broken')\n")
    daemon = JobdProcess(tmp_path / "d", fresh_database, modules=[module],
                         env={"PYTHONPATH": f"{ROOT}{os.pathsep}{extra}"})
    processes.append(daemon)
    daemon.start(wait=False)
    assert daemon.wait(DEADLINE_S) == EX_CONFIG, daemon.log_text()
    log = daemon.log_text()
    assert "bad config" in log and "handlers.modules" in log and module in log, log
    assert not daemon.socket.exists()


# --------------------------------------------------------------------------- 3. SIGHUP


def _concurrency(daemon: JobdProcess, queue: str) -> int | None:
    for row in daemon.jobctl_json("stats")["queues"]:
        if row["queue"] == queue:
            return row["concurrency"]
    return None


def test_sighup_reload(jobd, tmp_path: Path) -> None:
    daemon = jobd(queues={"default": {"concurrency": 5}, "extra": {"concurrency": 2}})
    assert _concurrency(daemon, "default") == 5
    assert _concurrency(daemon, "extra") == 2

    text = daemon.config.read_text()
    assert "concurrency = 5" in text
    daemon.config.write_text(text.replace("concurrency = 5", "concurrency = 7")
                             .replace('level = "info"', 'level = "debug"'))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: _concurrency(daemon, "default") == 7, "default concurrency 7")
    assert _concurrency(daemon, "extra") == 2
    wait_until(lambda: "config.reloaded" in [e.get("event") for e in daemon.log_events()],
               "config.reloaded in the log")

    # A job still runs after the reload.
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    wait_completed(daemon, job_id)

    # A broken file on SIGHUP: refused, logged, and the daemon keeps running as before.
    daemon.config.write_text(text.replace("concurrency = 5", 'concurrency = "lots"'))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "config.reload_failed" in [e.get("event") for e in daemon.log_events()],
               "config.reload_failed in the log")
    failed = next(e for e in daemon.log_events() if e.get("event") == "config.reload_failed")
    assert "$.queues.default.concurrency" in json.dumps(failed)
    assert daemon.proc.poll() is None
    assert daemon.jobctl_json("ping")["ready"] is True
    assert _concurrency(daemon, "default") == 7
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    wait_completed(daemon, job_id)

    # Unknown keys are refused the same way.
    daemon.config.write_text(text + "[queues.default.nested]\nx = 1\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: [e.get("event") for e in daemon.log_events()].count(
        "config.reload_failed") >= 2, "a second config.reload_failed")
    assert daemon.proc.poll() is None
    assert daemon.jobctl_json("ping")["ready"] is True

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()
