"""The control plane over the socket, through jobctl and the client library."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import anyio
import trio

from protocol.client import SyncClient, connect
from tests.support import ROOT, wait_until


def states(sql) -> dict[int, str]:
    return {r["id"]: r["state"] for r in sql.fetch("SELECT id, state FROM jobd.jobs")}


# A second queue the daemon serves, for the signals below that a negative check waits on.
WITH_PROBE = {"default": {"concurrency": 2}, "probe": {"concurrency": 1}}


def probe_ran(daemon, sql) -> None:
    """Returns once a job enqueued now in queue `probe` has completed: by then the
    daemon has handled every notification sent before it (Postgres delivers them in
    commit order, and a queue's wake is routed before the next one is read) and its
    dispatchers have claimed since, so a job it would have started has started."""
    job = int(daemon.jobctl("enqueue", "noop", "--queue", "probe").stdout)
    wait_until(lambda: states(sql).get(job) == "completed", "the probe job to complete")


def notifications_handled(daemon) -> None:
    """Returns once the daemon has handled every notification sent before the call,
    for when no job may run: it pauses queue `probe`, whose NOTIFY follows theirs, and
    waits for the daemon's own pause set (only that NOTIFY updates it; `stats` shows
    it) to hold it; then resumes the queue."""
    daemon.jobctl("pause", "probe")

    def probe_paused() -> bool:
        queues = daemon.jobctl_json("stats")["queues"]
        return any(q["queue"] == "probe" and q["paused"] for q in queues)

    wait_until(probe_paused, "the daemon to see the probe queue paused")
    daemon.jobctl("resume", "probe")


def test_list_summary_and_bulk_operations(jobd, sql):
    daemon = jobd(queues={"default": {"concurrency": 4}})
    ok = [int(daemon.jobctl("enqueue", "noop", "--tag", "2025-10-14").stdout) for _ in range(3)]
    bad = [int(daemon.jobctl("enqueue", "flaky", "--args", '{"fatal": true}', "--tag",
                             "2025-10-14").stdout) for _ in range(2)]
    wait_until(lambda: all(s in ("completed", "failed") for s in states(sql).values()))

    summary = daemon.jobctl_json("summary", "--tag", "2025-10-14")
    assert summary["total"] == 5 and summary["completed"] == 3 and summary["failed"] == 2
    assert "total 5" in daemon.jobctl("summary", "--tag", "2025-10-14").stdout

    page = daemon.jobctl_json("list", "--state", "failed")
    assert sorted(j["id"] for j in page["jobs"]) == sorted(bad)
    first = daemon.jobctl_json("list", "--limit", "2")
    assert [j["id"] for j in first["jobs"]] == sorted(ok + bad, reverse=True)[:2]
    rest = daemon.jobctl_json("list", "--limit", "10", "--cursor", str(first["next_cursor"]))
    assert [j["id"] for j in rest["jobs"]] == sorted(ok + bad, reverse=True)[2:]
    assert rest["next_cursor"] is None

    dry = daemon.jobctl_json("retry", "--state", "failed", "--dry-run")
    assert dry == {"matched": 2, "changed": 0, "dry_run": True, "ids": []}
    assert all(states(sql)[i] == "failed" for i in bad)
    retried = daemon.jobctl_json("retry", "--state", "failed", "--kind", "flaky")
    assert retried["changed"] == 2
    # Fatal again: each ran once more, with its attempts topped up.
    wait_until(lambda: all(
        r["attempt"] == 2 and r["state"] == "failed"
        for r in sql.fetch("SELECT attempt, state FROM jobd.jobs WHERE id = any($1)", bad)))

    replayed = daemon.jobctl_json("replay", str(ok[0]))
    assert replayed["matched"] == 1 and len(replayed["ids"]) == 1
    new_id = replayed["ids"][0]
    wait_until(lambda: states(sql).get(new_id) == "completed")

    assert daemon.jobctl_json("delete", "--state", "completed", "--dry-run")["matched"] == 4
    deleted = daemon.jobctl_json("delete", "--state", "completed")
    assert deleted["changed"] == 4
    assert set(states(sql)) == set(bad)

    # A bulk operation without any filter is refused rather than touching every job.
    refused = daemon.jobctl("--json", "delete", check=False)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error"]["code"] == "bad_request"


def test_bulk_cancel_of_queued_and_running(jobd, sql):
    daemon = jobd(queues={"default": {"concurrency": 1}})
    running = int(daemon.jobctl("enqueue", "sleep", "--args", '{"seconds": 60}').stdout)
    wait_until(lambda: states(sql).get(running) == "running")
    queued = [int(daemon.jobctl("enqueue", "sleep", "--args", '{"seconds": 60}',
                                "--tag", "batch").stdout) for _ in range(3)]
    result = daemon.jobctl_json("cancel", "--kind", "sleep")
    assert result["matched"] == 4 and result["changed"] == 4
    wait_until(lambda: all(states(sql)[i] == "cancelled" for i in [running, *queued]), timeout=15)


def test_pause_resume_survives_restart(jobd, sql):
    daemon = jobd(queues=WITH_PROBE)
    daemon.jobctl("pause", "default")
    held = int(daemon.jobctl("enqueue", "noop").stdout)
    stats = daemon.jobctl_json("stats")
    assert next(q for q in stats["queues"] if q["queue"] == "default")["paused"] is True
    probe_ran(daemon, sql)
    assert states(sql)[held] == "available"

    daemon.signal(15)
    assert daemon.wait() == 0
    daemon.start()
    probe_ran(daemon, sql)
    assert states(sql)[held] == "available"  # the pause lives in Postgres

    # A paused key holds only its own jobs.
    daemon.jobctl("resume", "default")
    daemon.jobctl("pause", "default", "--key", "ebay")
    wait_until(lambda: states(sql)[held] == "completed")
    ebay = int(daemon.jobctl("enqueue", "noop", "--key", "ebay").stdout)
    amazon = int(daemon.jobctl("enqueue", "noop", "--key", "amazon").stdout)
    wait_until(lambda: states(sql)[amazon] == "completed")
    assert states(sql)[ebay] == "available"
    daemon.jobctl("resume", "default", "--key", "ebay")
    wait_until(lambda: states(sql)[ebay] == "completed")


def test_drain_reload_nodes_top_watch(jobd, sql):
    daemon = jobd(queues=WITH_PROBE)
    drained = daemon.jobctl_json("drain")
    assert drained["draining"] is True
    assert daemon.jobctl_json("ping")["draining"] is True
    held = int(daemon.jobctl("enqueue", "noop").stdout)
    notifications_handled(daemon)  # the dispatcher has been woken for `held`
    assert states(sql)[held] == "available"
    assert daemon.jobctl_json("drain", "--undo")["draining"] is False
    wait_until(lambda: states(sql)[held] == "completed")

    assert daemon.jobctl_json("reload")["ok"] is True
    nodes = daemon.jobctl_json("nodes")["daemons"]
    assert [n["region"] for n in nodes] == ["test"]

    job = int(daemon.jobctl("enqueue", "sleep", "--args", '{"seconds": 1.5, "steps": 3}').stdout)
    watched = subprocess.run(
        [sys.executable, "-m", "daemon.jobctl", "--socket", str(daemon.socket), "--json",
         "watch", str(job)], cwd=ROOT, env=daemon.env, capture_output=True, text=True,
        timeout=30)
    frames = [json.loads(line) for line in watched.stdout.splitlines()]
    assert watched.returncode == 0
    assert frames[-1]["state"] == "completed"
    assert len(frames) >= 2  # it streamed changes, not just the end

    long = int(daemon.jobctl("enqueue", "sleep", "--args", '{"seconds": 30}').stdout)
    wait_until(lambda: states(sql)[long] == "running")
    frame = daemon.jobctl("top", "--once").stdout
    assert "default" in frame and str(long) in frame and "sleep" in frame


def test_client_from_asyncio_and_trio(jobd):
    daemon = jobd()
    path = str(daemon.socket)

    async def use_it() -> tuple[int, str]:
        async with connect(path) as client:
            done = await client.enqueue("noop", {}, tags=["client"])
            for _ in range(200):
                job = await client.get(done.id)
                if job.state == "completed":
                    break
                await anyio.sleep(0.05)
            # Concurrent requests on one connection.
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(client.ping)
            return done.id, job.state

    asyncio_id, asyncio_state = asyncio.run(use_it())
    trio_id, trio_state = trio.run(use_it)
    assert asyncio_state == trio_state == "completed"
    assert asyncio_id != trio_id
    assert SyncClient(path).summary(tag="client").completed == 2


def test_values_postgres_refuses_are_bad_requests_not_crashes(jobd):
    daemon = jobd()
    huge = daemon.jobctl("--json", "get", str(2**64 - 1), check=False)
    assert huge.returncode == 1
    assert json.loads(huge.stdout)["error"]["code"] == "bad_request"
    nul = daemon.jobctl("--json", "resume", "bad\x01queue", check=False)
    assert nul.returncode in (0, 1)  # accepted or refused, but answered
    assert daemon.jobctl_json("ping")["ready"] is True
