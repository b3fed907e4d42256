"""Flow-control tools through a Postgres restart: a pending batch and a pending debounce
are rows, so they outlive the outage, and enqueues during it are `unavailable`, never a
half-written item. Uses a private cluster (not the session one) so it can be stopped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocol.client import SyncClient
from protocol.errors import JobdError
from tests.e2e.flow_tools_handlers import TABLE
from tests.support import JobdProcess, Sql, wait_until


def test_pending_batch_and_debounce_outlive_a_postgres_restart(cluster, tmp_path: Path) -> None:
    url = cluster.create_database("jobd_tools_outage")
    sql = Sql(url)
    daemon = JobdProcess(tmp_path / "d", url, modules=["tests.e2e.flow_tools_handlers"],
                         jobs={"lease": "3s"}, daemon={"heartbeat": "0.5s"},
                         extra_toml='[kinds."tools.daily"]\nbatch_timeout = "4s"\n'
                                    '[kinds."tools.capture"]\ndebounce = "4s"\n')
    try:
        daemon.start()
        sql.execute(TABLE)
        client = SyncClient(str(daemon.socket))
        for i in range(3):
            assert client.enqueue("tools.daily", {"day": "mon", "i": i}).outcome == "batched"
        capture = client.enqueue("tools.capture", {"market": "m", "n": 1})

        cluster.stop()
        with pytest.raises(JobdError) as info:
            client.enqueue("tools.daily", {"day": "mon", "i": 99})
        assert info.value.code == "unavailable"
        time.sleep(1.0)
        assert daemon.proc.poll() is None, daemon.log_text()
        cluster.start()

        wait_until(lambda: client.ping().ready, "ready again", daemons=(daemon,))
        for i in range(3, 8):
            client.enqueue("tools.daily", {"day": "mon", "i": i})
        wait_until(lambda: sql.fetchval("SELECT count(*) FROM tool_items") == 8 and
                   sql.fetchval("SELECT count(*) FROM tool_runs") == 1,
                   "the batches and the debounced run", timeout=60, daemons=(daemon,))
        time.sleep(1.0)
        items = sql.fetch("SELECT job_id, i FROM tool_items")
        assert sorted(r["i"] for r in items) == list(range(8))  # 99 was refused, not stored
        sizes = sorted(n for n in (sum(1 for r in items if r["job_id"] == j)
                                   for j in {r["job_id"] for r in items}))
        assert sum(sizes) == 8 and max(sizes) <= 5
        assert sql.fetchval("SELECT job_id FROM tool_runs") == capture.id
    finally:
        daemon.kill()
