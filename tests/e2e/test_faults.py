"""One daemon works through thousands of effect jobs while its Postgres is restarted
(fast and immediate), stopped for 20 s, and has the daemon's backends terminated.

The same daemon process must survive every fault; at the end every job is completed and
every job's effect (an O_APPEND line outside Postgres, tests/e2e/fault_handlers.py)
happened at least once. A job may show more than one effect only when the extra
attempt was in flight at a fault: its completion was never written, it was rescued, and
a fault window lies between its start and its rescue (`fault_handlers.analyse`). During
the 20 s outage `/readyz` answers 503 and `jobctl ping` says not ready; afterwards both
say ready again.

The cluster is private (so it can be restarted) and keeps `synchronous_commit` on: an
immediate shutdown must not lose commits the daemon was told about, or the harness
itself would lose jobs. Every wait is event-driven with a generous deadline; nothing
asserts on timing.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.embedded import EmbeddedPostgres
from tests import support
from tests.e2e.fault_handlers import (
    EFFECTS_ENV,
    DurableCluster,
    Fault,
    analyse,
    pg_restart,
    read_effects,
    terminate_backends,
)
from tests.support import JobdProcess, Sql

DATABASE = "jobd_faults"
MIN_JOBS = 3_000
BATCH = 500
PROGRESS_BETWEEN_FAULTS = 100  # completions after a fault before the next one
OUTAGE_S = 20.0
DEADLINE_S = 120.0  # generous: 8 helpers share 2 cores
# 13 faults: 3 fast restarts, 2 immediate restarts, one 20 s outage, 7 rounds of
# pg_terminate_backend on the daemon's sessions.
PLAN = ["terminate", "restart_fast", "terminate", "restart_immediate", "terminate",
        "outage", "terminate", "restart_fast", "terminate", "restart_immediate",
        "terminate", "restart_fast", "terminate"]


@pytest.fixture
def cluster() -> Iterator[DurableCluster]:
    root = Path(tempfile.mkdtemp(prefix="jobd-f-"))  # not under tmp_path: test_db_outage.py
    pg = DurableCluster(root / "pg")
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- faults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


TOKEN = "fault-test-token"


def v1(port: int, command: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /v1/<command>: (status, the reply envelope)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/{command}", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ping(daemon: JobdProcess) -> dict[str, Any] | None:
    result = daemon.jobctl("--json", "ping", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self, daemon: JobdProcess, sql: Sql, port: int, tmp: Path):
        self.daemon, self.sql, self.port, self.tmp = daemon, sql, port, tmp
        self.ids: list[int] = []
        self.faults: list[Fault] = []
        self.rng = random.Random(14)
        self.daemon_id = ""

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
        return support.wait_until(predicate, what, timeout=timeout, interval=0.1,
                                  daemons=(self.daemon,))

    def alive(self, when: str) -> None:
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, (
            f"jobd exited ({self.daemon.proc.returncode}) {when}:\n"
            f"{self.daemon.log_text()[-8000:]}")

    def ready(self) -> bool:
        p = ping(self.daemon)
        return p is not None and p["ready"] and readyz(self.port) == 200

    def enqueue(self, n: int) -> None:
        args = self.tmp / "args.jsonl"
        args.write_text("".join(json.dumps({"hold_s": round(self.rng.uniform(0, 0.05), 3)})
                                + "\n" for _ in range(n)))
        ids = self.daemon.jobctl_json("enqueue", "fault_effect", "--args-file", str(args))["ids"]
        assert len(ids) == n
        self.ids += ids

    def completed(self) -> int:
        try:
            return self.sql.fetchval("SELECT count(*) FROM jobd.jobs"
                                     " WHERE kind = 'fault_effect' AND state = 'completed'")
        except Exception:  # the cluster may be restarting under us
            return -1

    def inject(self, kind: str, cluster: EmbeddedPostgres) -> None:
        started = time.time()
        detail = ""
        if kind == "terminate":
            detail = f"{terminate_backends(cluster, DATABASE)} backends"
        elif kind == "restart_fast":
            pg_restart(cluster, "fast")
        elif kind == "restart_immediate":
            pg_restart(cluster, "immediate")
        elif kind == "outage":
            cluster.stop()
            # Not ready on both surfaces while Postgres is down (it is down: no race).
            self.wait("ping to say not ready", lambda: (p := ping(self.daemon)) is not None
                      and p["ready"] is False)
            self.wait("/readyz to answer 503", lambda: readyz(self.port) == 503)
            time.sleep(max(0.0, started + OUTAGE_S - time.time()))
            assert readyz(self.port) == 503
            p = ping(self.daemon)
            assert p is not None and p["ready"] is False, p
            text = self.daemon.jobctl("ping").stdout
            assert "NOT ready" in text, text
            # Commands that need the database answer `unavailable` on both surfaces.
            status, reply = v1(self.port, "get", {"job_id": self.ids[0]})
            assert (status, reply.get("code")) == (503, "unavailable"), (status, reply)
            got = self.daemon.jobctl("--json", "get", str(self.ids[0]), check=False)
            assert got.returncode == 1 and json.loads(got.stdout)["error"]["code"] == \
                "unavailable", got
            self.alive("during the outage")
            cluster.start()
        self.wait(f"ready again after {kind}", self.ready)
        self.alive(f"after {kind}")
        p = ping(self.daemon)
        assert p is not None and p["daemon_id"] == self.daemon_id, p  # the same daemon
        self.faults.append(Fault(kind, started, time.time(), detail))


def test_daemon_survives_postgres_faults(cluster: DurableCluster, tmp_path: Path) -> None:
    url = cluster.create_database(DATABASE)
    effects = tmp_path / "effects.log"
    port = free_port()
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    daemon = JobdProcess(
        tmp_path / "d", url, modules=["tests.e2e.fault_handlers"],
        queues={"faults": {"concurrency": 30}},
        jobs={"lease": "3s", "reaper_interval": "0.5s", "poll_interval": "0.5s",
              "retention.completed_max_count": 1_000_000},
        daemon={"heartbeat": "0.5s"},
        control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)},
        env={EFFECTS_ENV: str(effects)},
    )
    run = Run(daemon, Sql(url), port, tmp_path)
    try:
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        run.daemon_id = daemon.jobctl_json("ping")["daemon_id"]
        run.wait("/readyz to answer 200", lambda: readyz(port) == 200)
        run.enqueue(BATCH * 2)
        for kind in PLAN:
            done = run.wait("the job count", lambda: (n := run.completed()) >= 0 and (n,))[0]
            if len(run.ids) - done < BATCH:
                run.enqueue(BATCH)
            target = done + PROGRESS_BETWEEN_FAULTS
            run.wait(f"{PROGRESS_BETWEEN_FAULTS} completions before {kind}",
                     lambda target=target: run.completed() >= target)
            run.inject(kind, cluster)
        if len(run.ids) < MIN_JOBS:
            run.enqueue(MIN_JOBS - len(run.ids))
        run.wait(f"all {len(run.ids)} jobs completed",
                 lambda: run.completed() == len(run.ids), timeout=DEADLINE_S * 2)
        run.alive("at the end")
        assert daemon.proc.pid == pid

        rows = run.sql.fetch("SELECT id, state, attempt, errors FROM jobd.jobs"
                             " WHERE kind = 'fault_effect'")
        jobs = {r["id"]: (r["state"], r["attempt"], json.loads(r["errors"])) for r in rows}
        assert set(jobs) == set(run.ids)
        report = analyse(read_effects(effects), jobs, run.faults)
        print(f"faults: {[(f.kind, round(f.ended_at - f.started_at, 1)) for f in run.faults]}")
        print(f"analysis: {report}")
        assert len(run.faults) >= 10
        assert not report.lost, f"jobs whose effect never happened: {report.lost[:20]}"
        assert not report.not_completed, report.not_completed
        assert not report.attempt_twice, f"one attempt ran twice: {report.attempt_twice[:20]}"
        assert not report.unattributed, "\n".join(report.unattributed[:20])

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(DEADLINE_S) == 0, daemon.log_text()[-8000:]
    finally:
        daemon.kill()
