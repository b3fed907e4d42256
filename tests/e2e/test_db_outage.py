"""Losing the database does not kill the daemon: it reports not-ready, refuses work with
`unavailable`, and recovers by itself when Postgres comes back.

Uses a private cluster (not the session one) so the test can stop and restart it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from daemon.embedded import EmbeddedPostgres
from protocol import SyncClient
from protocol.errors import JobdError
from tests.support import JobdProcess, Sql, wait_until

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


# --------------------------------------------------------------------------- under load

MODULES = ["examples.basic", "tests.e2e.outage_handlers"]


def outage_daemon(tmp_path: Path, url: str, name: str = "d",
                  **options) -> tuple[JobdProcess, Path]:
    """A daemon running tests/e2e/outage_handlers.py; daemons of one test share the
    effects file."""
    effects = tmp_path / "effects.log"
    effects.touch()
    options.setdefault("jobs", {"lease": "2s", "reaper_interval": "0.5s"})
    options.setdefault("daemon", {"heartbeat": "0.5s"})
    daemon = JobdProcess(tmp_path / name, url, modules=MODULES,
                         queues={"outage": {"concurrency": 100, "claim_batch": 100}},
                         env={"JOBD_TEST_EFFECTS": str(effects)}, **options)
    return daemon, effects


def sql_enqueue(url: str, n: int, args: dict) -> list[int]:
    rows = Sql(url).fetch(
        "SELECT jobd.enqueue('file_effect', $1::jsonb, queue => 'outage', max_attempts => 25)"
        " AS id FROM generate_series(1, $2)", json.dumps(args), n)
    return [r["id"] for r in rows]


def effects_by_job(effects: Path, what: str = "done") -> dict[int, list[int]]:
    runs: dict[int, list[int]] = {}
    for line in effects.read_text().splitlines():
        kind, job_id, attempt = line.split()
        if kind == what:
            runs.setdefault(int(job_id), []).append(int(attempt))
    return runs


def states(url: str) -> dict[str, int]:
    return {r["state"]: r["n"] for r in Sql(url).fetch(
        "SELECT state, count(*) AS n FROM jobd.jobs GROUP BY state")}


def terminate_jobd_backends(cluster: EmbeddedPostgres) -> None:
    cluster.query("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                  " WHERE application_name = 'jobd'")


def test_jobs_that_finish_during_an_outage_longer_than_the_lease_run_once(
        cluster: EmbeddedPostgres, tmp_path: Path) -> None:
    """The completer holds their outcomes; the heart renews their leases as soon as the
    database is back, and the reaper holds rescue until it has: none runs again."""
    url = cluster.create_database("jobd_long_outage")
    daemon, effects = outage_daemon(tmp_path, url)
    try:
        daemon.start()
        ids = sql_enqueue(url, 40, {"hold_s": 2.5, "started": True})
        wait_until(lambda: len(effects_by_job(effects, "start")) == 40, "all 40 to start",
                   daemons=(daemon,))
        cluster.stop()
        # They finish while the database is away; the 2 s leases lapse meanwhile.
        wait_until(lambda: len(effects_by_job(effects)) == 40, "all 40 to finish",
                   daemons=(daemon,))
        # Long enough for the completer's retries to back off to seconds apart, so the
        # reaper (every 0.5 s) would sweep first after the restart.
        time.sleep(8)
        cluster.start()
        wait_until(lambda: states(url).get("completed") == 40, "all 40 completed in Postgres",
                   daemons=(daemon,))
        time.sleep(1.5)  # a few more sweeps: nothing may be rescued late either
        assert effects_by_job(effects) == {i: [1] for i in ids}
        rows = Sql(url).fetch("SELECT id, attempt, errors::text AS errors FROM jobd.jobs")
        assert {(r["attempt"], r["errors"]) for r in rows} == {(1, "[]")}
        events = [e.get("event") for e in daemon.log_events()]
        assert "reaper.rescue_held" in events
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()[-5000:]
    finally:
        daemon.kill()


def test_daemon_survives_terminated_connections_and_restarts_under_load(
        cluster: EmbeddedPostgres, tmp_path: Path) -> None:
    """pg_terminate_backend of every jobd connection, again and again, and fast restarts,
    with jobs in flight: the same daemon process finishes them all."""
    url = cluster.create_database("jobd_kills")
    daemon, effects = outage_daemon(tmp_path, url, jobs={"lease": "5s"})
    try:
        daemon.start()
        # 3,000 jobs of 0.5 s at concurrency 100: at least 15 s of work, twice the ~7 s
        # the faults take, so they hit a busy daemon however fast this machine is.
        ids = sql_enqueue(url, 3000, {"hold_s": 0.5})
        for round_ in range(12):
            time.sleep(0.5)
            if round_ in (4, 8):
                cluster.stop()  # pg_ctl stop -m fast, then start: a fast restart
                cluster.start()
            else:
                terminate_jobd_backends(cluster)
            assert daemon.proc.poll() is None, daemon.log_text()[-5000:]
        assert len(effects_by_job(effects)) < len(ids)  # the faults hit a busy daemon

        def all_done() -> bool:
            # Retention prunes completed jobs past the newest 1,000: count what is left.
            return (len(effects_by_job(effects)) == len(ids)
                    and set(states(url)) <= {"completed"})

        wait_until(all_done, "every job completed", daemons=(daemon,), timeout=90)
        assert set(effects_by_job(effects)) == set(ids)
        tree = daemon.jobctl_json("tree")
        assert all(child["state"] == "running" for child in tree["children"]), tree
        crashed = [e for e in daemon.log_events() if e.get("event") == "actor.crashed"]
        assert crashed == [], crashed[:3]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()[-5000:]
    finally:
        daemon.kill()


# --------------------------------------------------------------------------- drains


def cluster_pids(cluster: EmbeddedPostgres) -> list[int]:
    """The postmaster and its children (backends, checkpointer, ...)."""
    postmaster = cluster.pid
    assert postmaster is not None
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids


def hang(cluster: EmbeddedPostgres) -> list[int]:
    """Accepting nothing, answering nothing: every process of the cluster stopped."""
    pids = cluster_pids(cluster)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def unhang(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def drain_daemon(tmp_path: Path, url: str, name: str = "d") -> tuple[JobdProcess, Path]:
    return outage_daemon(tmp_path, url, name, jobs={"lease": "3s", "reaper_interval": "0.5s"},
                         daemon={"heartbeat": "0.5s", "drain_grace": "1s"})


def unwritten(daemon: JobdProcess) -> dict:
    [event] = [e for e in daemon.log_events() if e.get("event") == "daemon.unwritten"]
    return event


def drain_while(cluster: EmbeddedPostgres, tmp_path: Path, fault: str) -> None:
    url = cluster.create_database(f"jobd_drain_{fault}")
    daemon, effects = drain_daemon(tmp_path, url)
    pids: list[int] = []
    try:
        daemon.start()
        # 20 jobs that run until released, 30 that finish during the fault.
        long_ids = sql_enqueue(url, 20, {"hold_s": 3600, "started": True})
        short_ids = sql_enqueue(url, 30, {"hold_s": 2, "started": True})
        wait_until(lambda: len(effects_by_job(effects, "start")) == 50, "all 50 to start",
                   daemons=(daemon,))
        if fault == "down":
            cluster.stop()
        else:
            pids = hang(cluster)
            # Not-ready well before any statement times out (database.timeout, 30 s).
            wait_until(lambda: (p := ping(daemon)) is not None and p["ready"] is False,
                       "ping to report ready false", timeout=20, daemons=(daemon,))
        wait_until(lambda: len(effects_by_job(effects)) == 30, "30 to finish meanwhile",
                   daemons=(daemon,))
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()[-5000:]
        took = time.monotonic() - started
        # Bounded: grace 1 s + release + completer 15 s + the rest, whatever Postgres does.
        assert took < 45, took
        event = unwritten(daemon)
        assert (event["outcomes"], event["releases"]) == (30, 20), event
        assert "daemon.crashed" not in [e.get("event") for e in daemon.log_events()]

        # The database comes back; the leases lapse and another daemon takes the jobs.
        if fault == "down":
            cluster.start()
        else:
            unhang(pids)
            pids = []
        second, _ = drain_daemon(tmp_path, url, name="d2")
        try:
            second.start()
            wait_until(lambda: set(states(url)) == {"completed"}, "every job completed",
                       daemons=(second,))
            # At-least-once: the 30 finished during the fault ran again, nothing was lost.
            runs = effects_by_job(effects)
            assert set(runs) == set(long_ids) | set(short_ids)
            second.signal(signal.SIGTERM)
            assert second.wait(DEADLINE_S) == 0
        finally:
            second.kill()
    finally:
        unhang(pids)
        daemon.kill()


def test_a_drain_with_the_database_down_exits_cleanly_and_says_what_it_could_not_write(
        cluster: EmbeddedPostgres, tmp_path: Path) -> None:
    drain_while(cluster, tmp_path, "down")


def test_a_drain_with_the_database_hung_exits_cleanly_and_says_what_it_could_not_write(
        cluster: EmbeddedPostgres, tmp_path: Path) -> None:
    drain_while(cluster, tmp_path, "hung")


def test_a_drain_writes_every_outcome_handed_over(cluster: EmbeddedPostgres,
                                                  tmp_path: Path) -> None:
    """SIGTERM in the middle of a stream of quick jobs: every attempt that ran to its end
    is written before the daemon exits (the completer's mailbox closing used to drop the
    batch in hand)."""
    url = cluster.create_database("jobd_drain_flush")
    daemon, effects = drain_daemon(tmp_path, url)
    try:
        daemon.start()
        sql_enqueue(url, 3000, {"hold_s": 0.01})
        wait_until(lambda: len(effects_by_job(effects)) >= 500, "500 effects",
                   daemons=(daemon,))
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()[-5000:]
        events = [e.get("event") for e in daemon.log_events()]
        assert "daemon.unwritten" not in events and "actor.crashed" not in events
        done = set(effects_by_job(effects))
        rows = dict(Sql(url).fetch("SELECT id, state FROM jobd.jobs"))
        # (A claim in flight when the drain ends can leave jobs `running` that never
        # started here; their leases lapse and they are rescued. Not what this checks.)
        # Retention may have pruned some completed ones; none that ran is anything else.
        assert {rows[i] for i in done if i in rows} <= {"completed"}
    finally:
        daemon.kill()


# ------------------------------------------------------------------- group commit


def test_concurrent_enqueues_through_killed_connections_and_a_restart(
        cluster: EmbeddedPostgres, tmp_path: Path) -> None:
    """16 clients enqueue at once (their rows share statements) while the daemon's
    connections are killed and Postgres restarts: the daemon stays up, each call gets its
    own id or a typed `unavailable`, and every id handed out is a distinct job in
    Postgres (a write whose commit the daemon never heard of may leave a job nobody got
    an id for: at-least-once, never a lost one)."""
    url = cluster.create_database("jobd_group_commit")
    daemon, _ = outage_daemon(tmp_path, url)
    ids: list[int] = []
    refused: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        sync = SyncClient(str(daemon.socket), timeout=30)
        while not stop.is_set():
            try:
                done = sync.enqueue("noop", {}, queue="parked")
            except JobdError as exc:
                with lock:
                    refused.append(str(exc.code))
                time.sleep(0.05)
                continue
            with lock:
                ids.append(done.id)

    try:
        daemon.start()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for round_ in range(6):
            time.sleep(0.5)
            if round_ == 3:
                cluster.stop()
                cluster.start()
            else:
                terminate_jobd_backends(cluster)
            assert daemon.proc is not None and daemon.proc.poll() is None
        time.sleep(1.0)  # a last stretch with the database up
        stop.set()
        for t in threads:
            t.join(60)
        assert ids, "no enqueue succeeded"
        assert set(refused) <= {"unavailable"}, set(refused)
        assert len(set(ids)) == len(ids)  # no id handed to two callers
        rows = {r["id"] for r in Sql(url).fetch(
            "SELECT id FROM jobd.jobs WHERE kind = 'noop' AND queue = 'parked'")}
        assert set(ids) <= rows  # every id a caller got is a job in Postgres
        assert daemon.jobctl_json("ping")["ready"] is True
    finally:
        stop.set()
        daemon.kill()


def test_workflow_steps_through_killed_connections_and_a_restart(
        cluster: EmbeddedPostgres, tmp_path: Path) -> None:
    """Steps of many workflows share statements (the step writer's group commit): kill
    every jobd connection again and again and restart Postgres fast while they stream.
    The same daemon process completes every workflow, each step a workflow saw return is
    stored, and every step is stored once with its own result."""
    url = cluster.create_database("jobd_wf_kills")
    acks = tmp_path / "acks"
    n, steps = 40, 60
    daemon = JobdProcess(tmp_path / "d", url, modules=["tests.e2e.workflow_handlers"],
                         queues={"wf": {"concurrency": n}},
                         jobs={"lease": "5s", "reaper_interval": "0.5s"},
                         daemon={"heartbeat": "0.5s"})

    def acknowledged() -> set[tuple[int, str]]:
        lines = acks.read_text().splitlines() if acks.exists() else []
        return {(int(j), s) for j, s in (ln.split() for ln in lines if ln.count(" ") == 1)}

    try:
        daemon.start()
        Sql(url).execute(
            "INSERT INTO jobd.jobs (kind, queue, args) SELECT 'wf.acked', 'wf', $1::jsonb"
            " FROM generate_series(1, $2)",
            json.dumps({"acks": str(acks), "steps": steps, "pause_s": 0.05}), n)
        wait_until(lambda: len(acknowledged()) >= n * 5, "steps streaming", daemons=(daemon,))
        for round_ in range(8):
            time.sleep(0.3)
            if round_ == 4:
                cluster.stop()  # pg_ctl stop -m fast, then start: a fast restart
                cluster.start()
            else:
                terminate_jobd_backends(cluster)
            assert daemon.proc.poll() is None, daemon.log_text()[-5000:]
        assert len(acknowledged()) < n * steps  # the faults hit workflows mid-stream
        wait_until(lambda: states(url) == {"completed": n}, "every workflow completed",
                   daemons=(daemon,), timeout=90)
        rows = Sql(url).fetch("SELECT job_id, name, result::text AS r FROM jobd.job_steps"
                              " WHERE finished_at IS NOT NULL")
        stored = {(r["job_id"], r["name"]) for r in rows}
        assert len(rows) == len(stored) == n * steps
        assert all(r["r"] == str(int(r["name"][1:]) ** 2) for r in rows)
        assert acknowledged() <= stored
        crashed = [e for e in daemon.log_events() if e.get("event") == "actor.crashed"]
        assert crashed == [], crashed[:3]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()[-5000:]
    finally:
        daemon.kill()
