"""Losing the database does not kill the daemon: it reports not-ready, refuses work with
`unavailable`, and recovers by itself when Postgres comes back.

Uses a private cluster (not the session one) so the test can stop and restart it.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.embedded_pg import EmbeddedPostgres
from tests.support import JobdProcess, wait_until

DEADLINE_S = 60.0


def ping(daemon: JobdProcess) -> dict | None:
    result = daemon.jobctl("--json", "ping", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def enqueue_and_complete(daemon: JobdProcess, kind: str = "noop") -> int:
    job_id = int(daemon.jobctl("enqueue", kind).stdout)

    def completed() -> bool:
        result = daemon.jobctl("--json", "get", str(job_id), check=False)
        return result.returncode == 0 and json.loads(result.stdout)["state"] == "completed"

    wait_until(completed, f"job {job_id} to complete")
    return job_id


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    # Not under tmp_path: every pytest session that starts resets /tmp/pytest-of-<user> to
    # 0700, which (running as root) locks the server user out of a cluster below it until
    # start() re-adds o+x; a concurrent run can do that between the two and fail the restart.
    root = Path(tempfile.mkdtemp(prefix="jobd-t-"))
    pg = EmbeddedPostgres(root / "pg", fast=True)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_daemon_survives_database_outage(cluster: EmbeddedPostgres, tmp_path: Path) -> None:
    url = cluster.create_database("jobd_outage")
    # No polling fallback worth the name: after the outage, jobs are only found through
    # NOTIFY on the LISTEN connection (or the wake-up it sends when it reconnects).
    daemon = JobdProcess(tmp_path / "d", url, jobs={"lease": "3s", "poll_interval": "1h"},
                         daemon={"heartbeat": "0.5s"})
    try:
        daemon.start()
        enqueue_and_complete(daemon)

        # -- the database goes away ---------------------------------------------------
        cluster.stop()
        wait_until(lambda: (p := ping(daemon)) is not None and p["ready"] is False,
                   "ping to report ready false")
        assert daemon.proc.poll() is None, daemon.log_text()

        result = daemon.jobctl("--json", "enqueue", "noop", check=False)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert json.loads(result.stdout)["error"]["code"] == "unavailable"
        result = daemon.jobctl("enqueue", "noop", check=False)
        assert result.returncode == 1
        assert "unavailable" in result.stderr

        # Still alive a little later: a few heartbeats, claims and sweeps have failed by now.
        time.sleep(2)
        assert daemon.proc.poll() is None, daemon.log_text()
        assert ping(daemon)["ready"] is False

        # -- it comes back --------------------------------------------------------------
        cluster.start()
        assert cluster.url("jobd_outage") == url  # same socket dir, same URL
        wait_until(lambda: (p := ping(daemon)) is not None and p["ready"] is True,
                   "ping to report ready true again")
        enqueue_and_complete(daemon)
        # The dispatcher now waits for NOTIFY (poll interval 1h): these complete only if the
        # LISTEN connection came back.
        enqueue_and_complete(daemon)
        enqueue_and_complete(daemon, "flaky")  # retries go through the store too
        events = [e.get("event") for e in daemon.log_events()]
        assert "store.listen_lost" in events

        # The tree is intact, no actor left failed.
        tree = daemon.jobctl_json("tree")
        assert all(child["state"] == "running" for child in tree["children"]), tree

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()
    finally:
        daemon.kill()
