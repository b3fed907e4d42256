"""The flow claim through killed connections and a Postgres restart, on a real daemon:
keyed and keyless jobs in one flow-controlled queue all finish, once each, no key past
its concurrency, and the daemon stays up. Uses a private cluster it can stop."""

from __future__ import annotations

import time
from pathlib import Path

from protocol.client import SyncClient
from protocol.jobs import JobSpec
from tests.e2e.flow_handlers import TABLE
from tests.e2e.test_flow_e2e import max_overlap
from tests.support import JobdProcess, Sql, wait_until


def test_flow_claims_survive_killed_connections_and_a_restart(cluster, tmp_path: Path) -> None:
    url = cluster.create_database("jobd_flow_outage")
    sql = Sql(url)
    sql.execute(TABLE)
    daemon = JobdProcess(tmp_path / "d", url, modules=["tests.e2e.flow_handlers"],
                         queues={"crawl": {"concurrency": 40, "key_concurrency": 3,
                                           "rate": "1000/s"}},
                         jobs={"lease": "5s", "reaper_interval": "0.5s"})
    try:
        daemon.start()
        client = SyncClient(str(daemon.socket))
        specs = [JobSpec(kind="flow.call", args={"key": f"k{i % 10}", "hold_s": 0.2})
                 for i in range(400)]
        specs += [JobSpec(kind="flow.plain", args={"hold_s": 0.2}) for _ in range(100)]
        ids = client.enqueue_batch(specs).ids
        for round_ in range(8):
            time.sleep(0.4)
            if round_ == 4:
                cluster.stop()  # a fast restart mid-claims
                cluster.start()
            else:
                cluster.query("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                              " WHERE application_name = 'jobd'")
            assert daemon.proc.poll() is None, daemon.log_text()[-5000:]
        assert sql.fetchval("SELECT count(*) FROM flow_calls") < len(ids)  # hit a busy daemon

        wait_until(lambda: sql.fetchval("SELECT count(*) FROM jobd.jobs "
                                        "WHERE state = 'completed'") == len(ids),
                   "every job completed", timeout=120, daemons=(daemon,))
        calls = sql.fetch("SELECT job_id, key, started, ended FROM flow_calls")
        # At-least-once: a run whose finish met a killed connection may run again, but
        # every job finished, and no key ever ran more than 3 at once.
        assert {c["job_id"] for c in calls} == set(ids)
        by_key: dict[str, list] = {}
        for c in calls:
            if c["key"] is not None:
                by_key.setdefault(c["key"], []).append((c["started"], c["ended"]))
        assert len(by_key) == 10
        assert max(max_overlap(v) for v in by_key.values()) <= 3
        assert sum(1 for c in calls if c["key"] is None) >= 100
        assert daemon.proc.poll() is None
    finally:
        daemon.kill()
