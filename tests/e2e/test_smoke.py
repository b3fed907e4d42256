"""The shortest path through the real daemon: enqueue, run, read back."""

from __future__ import annotations

import json
import time


def test_enqueue_runs_and_reads_back(jobd, sql):
    daemon = jobd()
    job_id = int(daemon.jobctl("enqueue", "flaky", "--args", '{"failures": 1}').stdout)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = daemon.jobctl_json("get", str(job_id))
        if job["state"] == "completed":
            break
        time.sleep(0.1)
    assert job["state"] == "completed"
    assert job["attempt"] == 2
    assert job["result"] == {"attempts": 2}
    assert [e["class"] for e in job["errors"]] == ["unknown"]
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id) == "completed"
    stats = daemon.jobctl_json("stats")
    assert {"queue": "default"}.items() <= stats["queues"][0].items()
    assert json.loads(daemon.jobctl("--json", "ping").stdout)["ready"] is True
