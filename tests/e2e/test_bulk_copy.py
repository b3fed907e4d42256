"""Bulk enqueue by COPY through the real daemon and `jobctl enqueue --args-file`: the
batch's NOTIFY wakes a running daemon (polling is pushed out of the way), and a backend
killed mid-COPY is `unavailable` for that call, writes nothing, and leaves the daemon
serving."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import asyncpg

from daemon.store.jobs import COPY_MIN_ROWS
from tests.support import ROOT, wait_until

N = COPY_MIN_ROWS * 4


def args_file(tmp_path, n: int = N):
    path = tmp_path / "args.jsonl"
    path.write_text("{}\n" * n)  # noop takes no args
    return path


def test_a_copied_batch_wakes_the_daemon_and_runs(jobd, sql, tmp_path):
    # No poll within the test: only the COPY's NOTIFY can start these jobs.
    daemon = jobd(jobs={"poll_interval": "1h"})
    out = daemon.jobctl_json("enqueue", "noop", "--args-file", str(args_file(tmp_path)))
    assert out["created"] == N and out["ids"] == sorted(out["ids"])
    wait_until(lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.jobs WHERE id = ANY($1::bigint[]) AND state = 'completed'",
        out["ids"]) == N, "every copied job to complete", timeout=30, daemons=(daemon,))


class TableLock:
    """A session holding SHARE on jobd.jobs, which a COPY (ROW EXCLUSIVE) waits for."""

    def __init__(self, url: str):
        self._url = url
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE jobd.jobs IN SHARE MODE")
                self._held.set()
                await asyncio.to_thread(self._release.wait)
        finally:
            await conn.close()

    def __enter__(self) -> TableLock:
        self._thread.start()
        assert self._held.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(10)


def test_a_backend_killed_mid_copy_is_unavailable_and_writes_nothing(jobd, sql, tmp_path):
    daemon = jobd(queues={"default": {"concurrency": 5}})
    path = args_file(tmp_path)
    with TableLock(sql.url):
        call = subprocess.Popen(
            [sys.executable, "-m", "daemon.jobctl", "--socket", str(daemon.socket), "--json",
             "enqueue", "noop", "--args-file", str(path)],
            cwd=ROOT, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pid = wait_until(lambda: sql.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'jobd'"
            " AND query LIKE 'COPY %' AND wait_event_type = 'Lock'"),
            "the COPY to wait for the lock", timeout=30, daemons=(daemon,))
        assert sql.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        stdout, stderr = call.communicate(timeout=60)
    assert call.returncode == 1, (stdout, stderr)
    assert json.loads(stdout)["error"]["code"] == "unavailable"
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 0
    assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
    again = daemon.jobctl_json("enqueue", "noop", "--args-file", str(path))
    assert again["created"] == N
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == N
