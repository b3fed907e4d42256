"""Fault soak: two daemons work through effect jobs while N faults hit them.

    /work/main/.venv/bin/python bench/soak.py --faults 100 [--seed 14] [--outage 20]

Faults (mixed in fixed proportions, order shuffled by --seed): Postgres `restart -m fast`
and `-m immediate`, Postgres stopped for --outage seconds, pg_terminate_backend of the
daemons' sessions, SIGKILL of a daemon then a restart, SIGTERM (drain) of a daemon then a
restart, and SIGSTOP of a daemon past the lease while the other one runs, then SIGCONT.

Both daemons run tests/e2e/fault_handlers.py's `fault_effect`, which appends one line per
attempt to a file outside Postgres. At the end every job must be completed and every
effect present; duplicates are counted and checked against the fault windows
(fault_handlers.analyse). Prints faults survived by kind, effects lost, duplicates (and
how many are attributable to attempts in flight at a fault), daemon deaths, and the time
to resume (first completed job after the fault ends). The raw result goes to
bench/results/soak-<time>.json. A daemon that dies is recorded with its last log lines
and restarted, so one bug does not end the soak.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.fault_handlers import (  # noqa: E402
    EFFECTS_ENV,
    DurableCluster,
    Fault,
    analyse,
    pg_restart,
    read_effects,
    terminate_backends,
)
from tests.support import JobdProcess, Sql  # noqa: E402

DATABASE = "jobd_soak"
LEASE_S = 3.0
# Share of each kind in the mix (sums to 100).
MIX = {"terminate": 22, "restart_fast": 14, "restart_immediate": 14, "outage": 6,
       "daemon_kill": 16, "daemon_restart": 12, "sigstop": 16}
PG_KINDS = ("terminate", "restart_fast", "restart_immediate", "outage")
BACKLOG = 1000
PROGRESS_BETWEEN_FAULTS = 50
WAIT_S = 180.0


def plan(n: int, rng: random.Random) -> list[str]:
    kinds = [k for k, share in MIX.items() for _ in range(round(n * share / 100))]
    while len(kinds) < n:
        kinds.append(rng.choice(list(MIX)))
    kinds = kinds[:n]
    rng.shuffle(kinds)
    return kinds


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.rng = random.Random(args.seed)
        self.cluster = DurableCluster(work / "pg")
        self.effects = work / "effects.log"
        self.ids: list[int] = []
        self.faults: list[Fault] = []
        self.back_at: list[float] = []  # per fault: when its cause was gone (PG up, SIGCONT)
        self.deaths: list[dict[str, Any]] = []
        self.stalls: list[dict[str, Any]] = []
        self.daemons: dict[str, JobdProcess] = {}

    # -- setup ------------------------------------------------------------------

    def start(self) -> None:
        self.cluster.start()
        self.url = self.cluster.create_database(DATABASE)
        self.sql = Sql(self.url)
        for name in ("A", "B"):
            d = JobdProcess(
                self.work / name, self.url, modules=["tests.e2e.fault_handlers"],
                queues={"faults": {"concurrency": 30}},
                jobs={"lease": f"{LEASE_S}s", "reaper_interval": "0.5s",
                      "poll_interval": "0.5s", "retention.completed_max_count": 10_000_000},
                daemon={"heartbeat": "0.5s", "drain_grace": "5s"},
                env={EFFECTS_ENV: str(self.effects)},
            )
            d.start()
            self.daemons[name] = d

    # -- observation ------------------------------------------------------------

    def ping(self, d: JobdProcess) -> dict[str, Any] | None:
        try:
            r = d.jobctl("--json", "ping", check=False)
        except Exception:
            return None
        return json.loads(r.stdout) if r.returncode == 0 else None

    def completed(self) -> int:
        try:
            return self.sql.fetchval("SELECT count(*) FROM jobd.jobs"
                                     " WHERE kind = 'fault_effect' AND state = 'completed'")
        except Exception:
            return -1

    def completed_now(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while (n := self.completed()) < 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        return max(n, 0)

    def check_deaths(self, fault_index: int, kind: str) -> None:
        """A daemon that exited on its own: record it, then start it again."""
        for name, d in self.daemons.items():
            if d.proc is not None and d.proc.poll() is not None:
                tail = [ln for ln in d.log_text().splitlines()
                        if '"level":"critical"' in ln or '"level":"error"' in ln][-3:]
                self.deaths.append({"fault": fault_index, "kind": kind, "daemon": name,
                                    "returncode": d.proc.returncode,
                                    "log": [ln[:1500] for ln in tail]})
                log(f"daemon {name} DIED (rc {d.proc.returncode}) around fault #{fault_index}"
                    f" {kind}")
                self.restart(d)

    def restart(self, d: JobdProcess) -> None:
        for _ in range(3):
            try:
                d.start(wait=True)
                return
            except (RuntimeError, TimeoutError) as exc:
                log(f"restart of {d.directory.name} failed: {str(exc)[:300]}")
                d.kill()
                time.sleep(1)
        raise SystemExit("a daemon could not be restarted three times; giving up")

    def wait(self, what: str, predicate, fault_index: int, kind: str,
             timeout: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.check_deaths(fault_index, kind)
            time.sleep(0.1)
        self.stalls.append({"fault": fault_index, "kind": kind, "waiting_for": what})
        log(f"STALL: {what} not reached in {timeout:.0f}s after fault #{fault_index} {kind}")
        return False

    def all_ready(self) -> bool:
        return all((p := self.ping(d)) is not None and p["ready"] for d in self.daemons.values())

    # -- work -------------------------------------------------------------------

    def feed(self) -> None:
        """Keep at least BACKLOG unfinished jobs queued (counted in Postgres, not here)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                unfinished = self.sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE kind ="
                                               " 'fault_effect' AND state <> 'completed'")
            except Exception:
                time.sleep(0.2)
                continue
            if unfinished >= BACKLOG:
                return
            args = self.work / "args.jsonl"
            args.write_text("".join(json.dumps({"hold_s": round(self.rng.uniform(0.02, 0.3), 3)})
                                    + "\n" for _ in range(BACKLOG)))
            for d in self.daemons.values():
                r = d.jobctl("--json", "enqueue", "fault_effect", "--args-file", str(args),
                             check=False)
                if r.returncode == 0:
                    self.ids += json.loads(r.stdout)["ids"]
                    return
            time.sleep(0.2)
        log("could not enqueue more work")

    # -- faults -----------------------------------------------------------------

    def inject(self, i: int, kind: str) -> None:
        victim_name = self.rng.choice(["A", "B"])
        victim = self.daemons[victim_name]
        started, detail = time.time(), ""
        if kind == "terminate":
            detail = f"{terminate_backends(self.cluster, DATABASE)} backends"
        elif kind in ("restart_fast", "restart_immediate"):
            pg_restart(self.cluster, kind.split("_")[1])
        elif kind == "outage":
            self.cluster.stop()
            time.sleep(self.args.outage)
            not_ready = [n for n, d in self.daemons.items()
                         if (p := self.ping(d)) is not None and p["ready"] is False]
            detail = f"not ready during the outage: {','.join(not_ready) or 'none'}"
            self.cluster.start()
        elif kind == "daemon_kill":
            detail = victim_name
            victim.kill()
            self.restart(victim)
        elif kind == "daemon_restart":
            detail = victim_name
            victim.signal(signal.SIGTERM)
            try:
                rc = victim.wait(60)
            except Exception:
                rc = None
                victim.kill()
            detail += f" drain exit {rc}"
            if rc != 0:
                self.deaths.append({"fault": i, "kind": kind, "daemon": victim_name,
                                    "returncode": rc, "log": ["drain did not exit 0"]})
            self.restart(victim)
        elif kind == "sigstop":
            detail = victim_name
            victim.signal(signal.SIGSTOP)
            time.sleep(2 * LEASE_S + 1)  # past the lease: the other daemon rescues its jobs
            victim.signal(signal.SIGCONT)
        self.back_at.append(time.time())
        self.wait("both daemons ready", self.all_ready, i, kind)
        self.faults.append(Fault(kind, started, time.time(), detail))
        log(f"fault #{i} {kind} {detail} ({time.time() - started:.1f}s)")

    def run(self) -> dict[str, Any]:
        kinds = plan(self.args.faults, self.rng)
        t0 = time.time()
        self.start()
        for i, kind in enumerate(kinds):
            target = self.completed_now() + PROGRESS_BETWEEN_FAULTS
            self.feed()  # counted before the feed: the fed jobs alone reach the target
            self.wait(f"{PROGRESS_BETWEEN_FAULTS} completions", lambda t=target:
                      self.completed() >= t, i, kind)
            self.feed()  # work in hand when the fault hits, and to resume on after it
            self.inject(i, kind)
            self.check_deaths(i, kind)
        self.wait(f"all {len(self.ids)} jobs completed",
                  lambda: self.completed() == len(self.ids), len(kinds), "end", timeout=600)
        wall = time.time() - t0
        return self.report(kinds, wall)

    # -- report -----------------------------------------------------------------

    def report(self, kinds: list[str], wall: float) -> dict[str, Any]:
        rows = self.sql.fetch("SELECT id, state, attempt, errors,"
                              " extract(epoch FROM finished_at)::float8 AS fin"
                              " FROM jobd.jobs WHERE kind = 'fault_effect'")
        jobs = {r["id"]: (r["state"], r["attempt"], json.loads(r["errors"])) for r in rows}
        finished = sorted(r["fin"] for r in rows if r["state"] == "completed" and r["fin"])
        missing_rows = sorted(set(self.ids) - set(jobs))
        a = analyse(read_effects(self.effects), jobs, self.faults)
        died_at = {d["fault"] for d in self.deaths}
        survived: dict[str, list[int]] = {}
        resume: dict[str, list[float]] = {}
        for i, (f, back) in enumerate(zip(self.faults, self.back_at, strict=True)):
            ok, total = survived.setdefault(f.kind, [0, 0])
            survived[f.kind] = [ok + (i not in died_at), total + 1]
            nxt = next((t for t in finished if t > back), None)
            if nxt is not None:
                resume.setdefault(f.kind, []).append(nxt - back)
        resume_stats = {k: {"n": len(v), "median_s": round(statistics.median(v), 3),
                            "max_s": round(max(v), 3)} for k, v in resume.items()}
        pg_resume = [x for k in PG_KINDS for x in resume.get(k, [])]
        return {
            "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]]),
            "seed": self.args.seed, "outage_s": self.args.outage, "lease_s": LEASE_S,
            "wall_s": round(wall, 1), "jobs": len(self.ids), "faults": len(self.faults),
            "faults_survived_by_kind": {k: {"survived": v[0], "of": v[1]}
                                        for k, v in sorted(survived.items())},
            "daemon_deaths": self.deaths, "stalls": self.stalls,
            "effects_lost": len(a.lost), "lost_ids": a.lost[:50],
            "job_rows_missing": missing_rows[:50],
            "not_completed": len(a.not_completed),
            "not_completed_sample": dict(list(a.not_completed.items())[:20]),
            "duplicate_jobs": a.duplicate_jobs, "duplicate_effects": a.duplicate_effects,
            "duplicates_attributed_to_faults": a.attributed,
            "duplicates_attributed_by_kind": a.attributed_by_kind,
            "duplicates_finished_before_rescue": a.finished_before_rescue,
            "duplicates_unattributed": len(a.unattributed),
            "unattributed_sample": a.unattributed[:20],
            "same_attempt_twice": len(a.attempt_twice),
            "error_classes": a.error_classes,
            "resume_after_fault_s": resume_stats,
            "resume_after_postgres_returns_s": {
                "n": len(pg_resume),
                "median": round(statistics.median(pg_resume), 3) if pg_resume else None,
                "max": round(max(pg_resume), 3) if pg_resume else None},
            "fault_log": [{"kind": f.kind, "started_at": round(f.started_at, 3),
                           "ended_at": round(f.ended_at, 3), "detail": f.detail}
                          for f in self.faults],
        }

    def close(self) -> None:
        for d in self.daemons.values():
            try:
                if d.proc is not None and d.proc.poll() is None:
                    d.signal(signal.SIGCONT)
            except Exception:
                pass
            d.kill()
        try:
            self.cluster.stop()
        except Exception as exc:
            log(f"cluster stop failed: {exc}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=100)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--outage", type=float, default=20.0, help="seconds Postgres stays down")
    p.add_argument("--json", type=Path, help="where to write the raw result"
                   " (default bench/results/soak-<time>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jobd-soak-"))
    log(f"work dir {work}")
    soak = Soak(args, work)
    try:
        result = soak.run()
    finally:
        soak.close()
    result["work_dir"] = str(work) if args.keep else None
    out = args.json or ROOT / "bench" / "results" / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "fault_log"}, indent=2))
    print(f"faults survived: {result['faults_survived_by_kind']}")
    print(f"effects lost: {result['effects_lost']}; duplicates: {result['duplicate_effects']}"
          f" ({result['duplicates_attributed_to_faults']} attributable to in-flight attempts);"
          f" daemon deaths: {len(result['daemon_deaths'])};"
          f" resume after Postgres returns: {result['resume_after_postgres_returns_s']}")
    print(f"raw result: {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = (result["effects_lost"] == 0 and not result["daemon_deaths"]
          and not result["duplicates_unattributed"] and not result["not_completed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
