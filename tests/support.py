"""Helpers for tests that run the real daemon: a process wrapper and sync SQL."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], what: str = "a condition", *,
               timeout: float = 60.0, interval: float = 0.05,
               daemons: tuple[JobdProcess, ...] = ()) -> Any:
    """Poll until `predicate()` is truthy and return it; fail fast if a daemon exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for d in daemons:
            if d.proc is not None and d.proc.poll() is not None:
                raise AssertionError(f"jobd exited ({d.proc.returncode}) while waiting for "
                                     f"{what}:\n{d.log_text()[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_async(fn: Callable[[], Any]) -> Any:
    """`await fn()` on a private asyncio loop in a helper thread (tests run in trio)."""
    box: list[Any] = []

    def runner() -> None:
        try:
            box.append((True, asyncio.run(fn())))
        except BaseException as exc:  # re-raised in the caller
            box.append((False, exc))

    thread = threading.Thread(target=runner)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


async def generic_plan(connection: asyncpg.Connection, query: str, types: str, *args: Any,
                       analyze: bool = False) -> list[str]:
    """The plan Postgres settles on for a statement prepared and run many times (what
    asyncpg's prepared statements get after five runs), EXPLAINed with `args` as
    literals; `analyze` runs it (EXPLAIN ANALYZE, BUFFERS). `types`: "bigint[], text"."""
    await connection.execute("SET plan_cache_mode = force_generic_plan")
    await connection.execute(f"PREPARE probe({types}) AS {query}")
    try:
        literals = [await connection.fetchval(f"SELECT quote_literal($1::{t}) || '::{t}'", a)
                    for t, a in zip(types.split(", "), args, strict=True)]
        options = "ANALYZE, BUFFERS" if analyze else "COSTS OFF"
        rows = await connection.fetch(f"EXPLAIN ({options}) EXECUTE probe({', '.join(literals)})")
        return [r[0] for r in rows]
    finally:
        await connection.execute("DEALLOCATE probe; RESET plan_cache_mode")


class Sql:
    """Runs one statement per call on a private asyncio loop in a helper thread."""

    def __init__(self, url: str):
        self.url = url

    def _run(self, method: str, query: str, *args: Any) -> Any:
        async def main() -> Any:
            conn = await asyncpg.connect(self.url)
            try:
                return await getattr(conn, method)(query, *args)
            finally:
                await conn.close()

        return run_async(main)

    def fetch(self, query: str, *args: Any) -> list[Any]:
        return self._run("fetch", query, *args)

    def fetchval(self, query: str, *args: Any) -> Any:
        return self._run("fetchval", query, *args)

    def execute(self, query: str, *args: Any) -> str:
        return self._run("execute", query, *args)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


class JobdProcess:
    """A real `jobd run` on a given database, with a config written from keyword options.

    `queues={"default": {"concurrency": 5}}`, `jobs={"lease": "2s"}`, `env={...}`.
    """

    def __init__(self, directory: Path, database_url: str, *, region: str = "test",
                 modules: list[str] | None = None, queues: dict[str, dict[str, Any]] | None = None,
                 jobs: dict[str, Any] | None = None, daemon: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, database: bool = True,
                 control: dict[str, Any] | None = None, extra_toml: str = "",
                 nofile: tuple[int, int] | None = None):
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE for the daemon, else inherited
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "jobd.sock"
        self.config = directory / "jobd.toml"
        self.log = directory / "jobd.log"
        lines = [f"region = {toml_value(region)}"]
        if database:
            lines += ["[database]", f"url = {toml_value(database_url)}"]
        lines += ["[control]", f"socket = {toml_value(str(self.socket))}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in (control or {}).items()]
        lines += ["[log]", 'level = "info"', 'format = "json"']
        lines += ["[handlers]", f"modules = {toml_value(modules or ['examples.basic'])}"]
        for section, values in (("jobs", jobs), ("daemon", daemon)):
            if values:
                lines.append(f"[{section}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        for name, values in (queues or {}).items():
            lines.append(f"[queues.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        # `extra_toml` is appended verbatim, e.g. "[metrics]\nleader_interval = \"1s\"".
        self.config.write_text("\n".join(lines) + "\n" + extra_toml)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.env.pop("JOBD_DATABASE_URL", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        self.socket.unlink(missing_ok=True)
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.main", "run", "--config", str(self.config),
             "--state-dir", str(self.directory / "state")],
            cwd=ROOT, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT,
            preexec_fn=self._limit_descriptors if self.nofile else None,
        )
        if wait:
            self.wait_ready()

    def _limit_descriptors(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"jobd exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.socket.exists():
                result = self.jobctl("--json", "ping", check=False)
                if result.returncode == 0 and json.loads(result.stdout)["ready"]:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"jobd not ready after {timeout}s:\n{self.log_text()}")

    def jobctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "daemon.jobctl", "--socket", str(self.socket), *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"jobctl {args} -> {result.returncode}: {result.stderr}")
        return result

    def jobctl_json(self, *args: str) -> Any:
        return json.loads(self.jobctl("--json", *args).stdout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events
