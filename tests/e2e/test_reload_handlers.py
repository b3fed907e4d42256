"""A reload never stops or stalls the daemon, whatever a handler module does at import.

The module below reads what to do from files in a control directory, so a test decides
at each reload: raise SystemExit, raise KeyboardInterrupt, or block until released.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from daemon.config import EX_CONFIG
from tests.support import ROOT, JobdProcess, wait_until

MODULE = '''
import os
import pathlib
import time

import msgspec

from actors import Context, job

CTRL = pathlib.Path(os.environ["RELOAD_PROBE_DIR"])


def _read(name, default=""):
    path = CTRL / name
    return path.read_text().strip() if path.exists() else default


VERSION = _read("version", "1")


class Empty(msgspec.Struct):
    pass


@job("probe")
async def probe(ctx: Context, args: Empty) -> dict:
    return {"version": VERSION}


if VERSION != "1":
    # Registered before the module fails: a refused reload must not keep it.
    @job("probe.new")
    async def probe_new(ctx: Context, args: Empty) -> dict:
        return {}

mode = _read("mode")
if mode == "exit":
    raise SystemExit(3)
if mode == "interrupt":
    raise KeyboardInterrupt
if mode == "block":
    (CTRL / "importing").write_text("1")
    deadline = time.monotonic() + 15
    while not (CTRL / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
'''


def _daemon(tmp_path: Path, database_url: str, extra_toml: str = "") -> tuple[JobdProcess, Path]:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "reload_probe.py").write_text(MODULE)
    ctrl = tmp_path / "ctrl"
    ctrl.mkdir()
    daemon = JobdProcess(tmp_path / "d", database_url, modules=["reload_probe"],
                         env={"PYTHONPATH": f"{ROOT}{os.pathsep}{modules}",
                              "RELOAD_PROBE_DIR": str(ctrl)},
                         extra_toml=extra_toml)
    return daemon, ctrl


def _run_probe(daemon: JobdProcess, kind: str = "probe") -> dict:
    job_id = daemon.jobctl("enqueue", kind).stdout.strip()
    daemon.jobctl("watch", job_id)
    view = daemon.jobctl_json("get", job_id)
    assert view["state"] == "completed", view
    return view["result"]


def _reload(daemon: JobdProcess) -> dict:
    return daemon.jobctl_json("reload")


def _events(daemon: JobdProcess, name: str) -> list[dict]:
    return [e for e in daemon.log_events() if e.get("event") == name]


def test_reload_survives_systemexit_and_keyboardinterrupt(fresh_database: str, tmp_path: Path):
    daemon, ctrl = _daemon(tmp_path, fresh_database)
    try:
        daemon.start()
        assert _run_probe(daemon) == {"version": "1"}

        # SIGHUP with a module that raises SystemExit at import.
        (ctrl / "version").write_text("2")
        (ctrl / "mode").write_text("exit")
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: _events(daemon, "config.reload_failed"), "the refused reload",
                   daemons=(daemon,))
        assert "SystemExit(3)" in json.dumps(_events(daemon, "config.reload_failed")[-1])
        assert daemon.proc.poll() is None
        assert daemon.jobctl_json("ping")["ready"] is True
        # The previous handlers stay: probe.new, registered before the raise, is gone.
        assert daemon.jobctl("enqueue", "probe.new", check=False).returncode != 0
        assert "version" in _run_probe(daemon)

        # `jobctl reload` with a module that raises KeyboardInterrupt at import.
        (ctrl / "mode").write_text("interrupt")
        result = _reload(daemon)
        assert result["ok"] is False and "KeyboardInterrupt" in result["message"], result
        assert daemon.proc.poll() is None
        assert daemon.jobctl_json("ping")["ready"] is True

        # Fixed module: the reload goes through and the new kind exists.
        (ctrl / "mode").write_text("")
        assert _reload(daemon)["ok"] is True
        assert _run_probe(daemon) == {"version": "2"}
        assert _run_probe(daemon, "probe.new") == {}

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    finally:
        daemon.kill()


def test_slow_import_at_reload_does_not_stall_the_socket(fresh_database: str, tmp_path: Path):
    daemon, ctrl = _daemon(tmp_path, fresh_database)
    try:
        daemon.start()
        (ctrl / "mode").write_text("block")
        reload = subprocess.Popen(
            [sys.executable, "-m", "daemon.jobctl", "--socket", str(daemon.socket), "--json",
             "reload"], cwd=ROOT, env=daemon.env, stdout=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: (ctrl / "importing").exists(), "the import to begin",
                       daemons=(daemon,))
            # The import is blocked until we release it, so the reload is still pending
            # while the daemon answers everything else.
            assert daemon.jobctl_json("ping")["ready"] is True
            assert _run_probe(daemon) == {"version": "1"}
            assert reload.poll() is None
        finally:
            (ctrl / "release").write_text("1")
        out, _ = reload.communicate(timeout=60)
        assert json.loads(out)["ok"] is True
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    finally:
        daemon.kill()


def test_import_past_the_timeout_is_abandoned(fresh_database: str, tmp_path: Path):
    daemon, ctrl = _daemon(tmp_path, fresh_database)
    # A short timeout, written right under the [handlers] header.
    daemon.config.write_text(daemon.config.read_text().replace(
        "[handlers]\n", '[handlers]\nimport_timeout = "1s"\n'))
    try:
        daemon.start()
        (ctrl / "version").write_text("2")
        (ctrl / "mode").write_text("block")
        result = _reload(daemon)
        assert result["ok"] is False and "import_timeout" in result["message"], result
        assert (ctrl / "importing").exists()
        assert daemon.jobctl_json("ping")["ready"] is True
        # The abandoned import still runs: another reload is refused, not piled on.
        again = _reload(daemon)
        assert again["ok"] is False and "still running" in again["message"], again
        # What the abandoned import registered is not in force.
        assert daemon.jobctl("enqueue", "probe.new", check=False).returncode != 0
        (ctrl / "mode").write_text("")
        (ctrl / "release").write_text("1")
        wait_until(lambda: _events(daemon, "handlers.abandoned_import_ended"),
                   "the abandoned import to end", daemons=(daemon,))
        assert daemon.jobctl("enqueue", "probe.new", check=False).returncode != 0
        assert _reload(daemon)["ok"] is True
        assert _run_probe(daemon, "probe.new") == {}
    finally:
        daemon.kill()


def test_systemexit_at_start_is_a_config_error(fresh_database: str, tmp_path: Path):
    daemon, ctrl = _daemon(tmp_path, fresh_database)
    (ctrl / "mode").write_text("exit")
    daemon.start(wait=False)
    assert daemon.wait(60) == EX_CONFIG, daemon.log_text()[-3000:]
    lines = daemon.log_text().strip().splitlines()
    assert lines[-1].startswith("jobd: bad config: handlers.modules: cannot import "
                                "'reload_probe': SystemExit(3)"), lines[-3:]
    assert "Traceback" not in daemon.log_text()
    assert not daemon.socket.exists()
