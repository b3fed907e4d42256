"""jobd vs procrastinate, pgqueuer (Postgres) and arq (Redis): one command, one table.

    .bench-venv/bin/python bench/run.py [--quick] [--reps 3] [--only jobd,pgqueuer] [--json F]

Starts its own durable Postgres (daemon.embedded.EmbeddedPostgres, one database per
system) in a temp dir, runs every scenario for every system `--reps` times and prints
medians with min-max spreads; the raw numbers go to bench/results/<time>.json.
Peers run as subprocesses (bench/peers/*_peer.py); a peer that fails records its error
in the table and the run goes on. arq needs Redis on 127.0.0.1:6379 (--redis URL).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402
from bench.common import PgConn, latency_summary, pg_cluster_cpu, rss_mb, summarize  # noqa: E402
from daemon.embedded import EmbeddedPostgres  # noqa: E402

PEERS = ["procrastinate", "pgqueuer", "pgqueuer b10", "arq", "dbos"]
SYSTEMS = ["jobd", *PEERS]
# A column that is another setting of a peer: (driver, options for its workers). pgqueuer
# is reported at both claim batch sizes its docs suggest; the better one is "its best".
VARIANTS = {"pgqueuer b10": ("pgqueuer", {"claim_batch": 10})}
# Columns that only run some scenarios (the rest show why not).
ONLY = {"pgqueuer b10": {"e2e_1", "e2e_2", "lat_idle", "lat_busy"}, "dbos": {"workflows"}}
BUSY_RATE = 2_000.0  # the "at 2,000 jobs/s offered", the same for every system
FULL = dict(bulk=100_000, single=2_000, e2e=50_000, peer_max_s=30.0, lat_n=300, lat_rate=30.0,
            busy_s=5.0, depth_small=10_000, depth_big=1_000_000, retention=1_000_000,
            flow=20_000, workflows=10_000, running=10_000, store_calls=5_000, dbos_wf=2_000)
QUICK = dict(bulk=10_000, single=300, e2e=10_000, peer_max_s=8.0, lat_n=60, lat_rate=30.0,
             busy_s=2.0, depth_small=10_000, depth_big=100_000, retention=50_000,
             flow=5_000, workflows=2_000, running=1_000, store_calls=2_000, dbos_wf=500)


# -- peers ------------------------------------------------------------------------------

class PeerError(Exception):
    pass


class PeerProc:
    """One peer driver subprocess; its @events are read on a thread."""

    loops: dict[str, str] = {}  # driver -> event loop, from --peer-loop

    def __init__(self, peer: str, mode: str, url: str, **opts: Any):
        peer, variant = VARIANTS.get(peer, (peer, {}))
        opts = {**(variant if mode in ("work", "serve") else {}), **opts}
        if peer in self.loops:
            opts.setdefault("loop", self.loops[peer])
        cmd = [sys.executable, str(ROOT / "bench" / "peers" / f"{peer}_peer.py"), mode,
               "--url", url]
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        self.events: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@"):
                tag, _, payload = line[1:].rstrip("\n").partition(" ")
                self.events.put((tag, json.loads(payload) if payload[:1] in ("{", "[") else payload))
        self.events.put(("eof", None))

    def expect(self, tag: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, payload = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise PeerError(f"timeout waiting for {tag}") from None
            if got == tag:
                return payload
            if got in ("error", "eof"):
                self.proc.wait(10)
                msg = payload["error"] if got == "error" else (
                    "".join(self.stderr).strip().splitlines() or ["exited"])[-1]
                raise PeerError(msg)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def peer_once(peer: str, mode: str, url: str, timeout: float = 600, **opts: Any) -> Any:
    p = PeerProc(peer, mode, url, **opts)
    try:
        return p.expect("result", timeout)
    finally:
        p.kill()


class StoreMeter:
    """CPU and transactions of the peer's store: Postgres database or the Redis server."""

    def __init__(self, kind: str, monitor: PgConn | None, dbname: str, postmaster: int,
                 redis_url: str):
        self.kind, self.monitor, self.dbname, self.postmaster = kind, monitor, dbname, postmaster
        self.redis_url = redis_url

    def snapshot(self) -> tuple[float, float]:
        if self.kind == "pg":
            return pg_cluster_cpu(self.postmaster), self.monitor.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
                self.dbname)
        import redis

        r = redis.Redis.from_url(self.redis_url)
        info = r.info()
        r.close()
        cpu = info["used_cpu_sys"] + info["used_cpu_user"]
        return cpu, info["total_commands_processed"] - 1  # minus our INFO


def peer_e2e(peer: str, url: str, meter: StoreMeter, n: int, workers: int, max_s: float) -> dict:
    peer_once(peer, "clear", url)
    peer_once(peer, "enqueue-bulk", url, n=n, timeout=1200)
    time.sleep(1.0)
    cpu0, x0 = meter.snapshot()
    procs = [PeerProc(peer, "work", url, concurrency=200, max_seconds=max_s)
             for _ in range(workers)]
    try:
        results = [p.expect("result", max_s + 300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    time.sleep(0.7)
    cpu1, x1 = meter.snapshot()
    count = sum(r["count"] for r in results)
    first = min(r["first"] for r in results if r["first"])
    last = max(r["last"] for r in results if r["last"])
    out = {"jobs_per_s": count / (last - first), "processed": count,
           "daemon_cpu_s_per_1k": sum(r["cpu_s"] for r in results) / count * 1000,
           "pg_cpu_s_per_1k": (cpu1 - cpu0) / count * 1000,
           "db_round_trips_per_job": (x1 - x0) / count}
    peer_once(peer, "clear", url)
    return out


def peer_latency(peer: str, url: str, rate: float, n: int) -> dict:
    peer_once(peer, "clear", url)
    w = PeerProc(peer, "serve", url, concurrency=200, expect=n)
    try:
        w.expect("ready", 120)
        time.sleep(1.5)
        sent = peer_once(peer, "paced", url, rate=rate, n=n, timeout=600)
        res = w.expect("result", 300)
    finally:
        w.kill()
    return {**latency_summary(res["lat_ms"]), "achieved_rate": sent["achieved_rate"]}


def peer_memory(peer: str, url: str, running: int) -> dict:
    peer_once(peer, "clear", url)
    w = PeerProc(peer, "sleepers", url, concurrency=running, expect=running)
    try:
        w.expect("ready", 120)
        time.sleep(2.0)
        idle = rss_mb(w.proc.pid)
        peer_once(peer, "enqueue-bulk", url, n=running, kind="sleep", seconds=600)
        w.expect("running", 300)
        time.sleep(2.0)
        busy = rss_mb(w.proc.pid)
    finally:
        w.kill()
        peer_once(peer, "clear", url)
    return {"idle_rss_mb": idle, "running_rss_mb": busy,
            "kb_per_running_job": (busy - idle) * 1024 / running}


# -- the run ----------------------------------------------------------------------------

class Results:
    def __init__(self) -> None:
        self.raw: dict[str, dict[str, dict[str, list[float]]]] = {}
        self.notes: dict[str, dict[str, str]] = {}

    def add(self, system: str, scenario: str, values: dict) -> None:
        for k, v in values.items():
            self.raw.setdefault(system, {}).setdefault(scenario, {}).setdefault(k, []).append(v)

    def note(self, system: str, scenario: str, text: str) -> None:
        self.notes.setdefault(system, {})[scenario] = text

    def get(self, system: str, scenario: str, key: str) -> dict | None:
        return summarize(self.raw.get(system, {}).get(scenario, {}).get(key, []))


def attempt(res: Results, system: str, scenario: str, fn, *args, **kw) -> None:
    t = time.perf_counter()
    try:
        values = fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - one failing peer never breaks the run
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:240]
        res.note(system, scenario, f"error: {msg}")
        print(f"  {system:13} {scenario:18} ERROR {msg}", flush=True)
        if system == "jobd":
            traceback.print_exc()
        return
    res.add(system, scenario, values)
    shown = ", ".join(f"{k}={v:,.4g}" for k, v in values.items() if isinstance(v, (int, float)))
    print(f"  {system:13} {scenario:18} {time.perf_counter() - t:5.1f}s  {shown}", flush=True)


def redis_available(url: str) -> str | None:
    try:
        import redis

        r = redis.Redis.from_url(url, socket_connect_timeout=2)
        r.ping()
        r.close()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"skipped: no Redis at {url} ({type(exc).__name__})"


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks: daemons, Postgres


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts, 1 repetition")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--only", help="comma-separated systems (default: all)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/13",
                    help="Redis for arq (its keys arq:* in this database are deleted)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--peer-loop", choices=["uvloop", "asyncio"], default="uvloop",
                    help="pgqueuer's event loop (its own CLI runs on uvloop when installed)")
    ap.add_argument("--table-from", type=Path, help="reprint the table of a results JSON")
    args = ap.parse_args()
    if args.table_from:
        print(table_from(args.table_from))
        return
    PeerProc.loops["pgqueuer"] = args.peer_loop
    size = QUICK if args.quick else FULL
    reps = args.reps or (1 if args.quick else 3)
    systems = args.only.split(",") if args.only else SYSTEMS
    res = Results()
    meta: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                            "reps": reps, "sizes": size, "started": time.strftime("%F %T"),
                            "systems": systems, "pgqueuer_loop": args.peer_loop,
                            "busy_rate": BUSY_RATE}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jobd-bench-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            meta["postgres"] = cluster.query("SHOW server_version").strip()
            urls = {s: cluster.create_database(s) for s in systems
                    if s != "arq" and s not in VARIANTS}
            for variant, (driver, _) in VARIANTS.items():
                if variant in systems:
                    urls[variant] = urls.get(driver) or cluster.create_database(driver)
            if "arq" in systems:
                urls["arq"] = args.redis
            monitor = PgConn(cluster.url("postgres"))
            ctx = None
            if "jobd" in systems:
                ctx = jb.Ctx(urls["jobd"], cluster.url("postgres"), "jobd", cluster.pid,
                             Path(tmp) / "jobd")
                boot = ctx.daemon()
                boot.start()  # applies jobd's migrations
                jb.stop([boot])
            skip: dict[str, str] = {}
            for peer in [p for p in PEERS if p in systems]:
                if peer == "arq" and (why := redis_available(args.redis)):
                    skip[peer] = why
                    continue
                if peer in VARIANTS and VARIANTS[peer][0] in systems:
                    continue  # its driver's setup made the schema
                try:
                    peer_once(peer, "setup", urls[peer], timeout=120)
                except Exception as exc:  # noqa: BLE001
                    skip[peer] = f"error: {exc}"[:160]
            for peer, why in skip.items():
                for sc in SCENARIO_KEYS:
                    res.note(peer, sc, why)
                print(f"  {peer}: {why}", flush=True)
            meters = {p: StoreMeter("redis" if p == "arq" else "pg", monitor,
                                    VARIANTS.get(p, (p,))[0], cluster.pid, args.redis)
                      for p in PEERS}
            flow_ok, flow_msg = (jb.flow_control_landed(Path(tmp)) if ctx else (False, ""))
            peak: dict[str, float] = {}
            for rep in range(reps):
                print(f"== repetition {rep + 1}/{reps}", flush=True)
                for system in systems:
                    if system in skip:
                        continue
                    if system == "jobd":
                        run_jobd(res, ctx, size, rep == reps - 1, flow_ok, peak,
                                 cluster.url("postgres"))
                    else:
                        run_peer(res, system, urls[system], meters[system], size, peak)
            if not flow_ok:
                res.note("jobd", "flow", "skipped: flow control not landed")
            for peer, scenarios in ONLY.items():
                why = ("n/a: same as pgqueuer" if peer in VARIANTS else "n/a: workflows only")
                for sc in SCENARIO_KEYS:
                    if sc not in scenarios and sc not in res.notes.get(peer, {}):
                        res.note(peer, sc, why)
            for peer in PEERS:
                if peer == "dbos":
                    continue
                res.note(peer, "flow", res.notes.get(peer, {}).get("flow", "n/a: no per-key limits"))
                res.note(peer, "workflows", "n/a: no durable workflows")
            if ctx:
                ctx.close()
            monitor.close()
        finally:
            cluster.stop()
    meta["wall_s"] = time.perf_counter() - t_start
    table = render(res, systems, reps)
    print()
    print(table)
    out = args.json or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "raw": res.raw, "notes": res.notes,
                               "table": table}, indent=2))
    print(f"\nraw numbers: {out}   ({meta['wall_s'] / 60:.1f} min)")


SCENARIO_KEYS = ["bridge", "enqueue", "e2e_1", "e2e_2", "lat_idle", "lat_busy",
                 "lat_idle_direct", "lat_busy_direct", "depth_small",
                 "depth_big", "retention", "flow", "flow_base", "workflows", "memory"]


def run_jobd(res: Results, ctx, size: dict, last_rep: bool, flow_ok: bool,
             peak: dict, admin_url: str) -> None:
    attempt(res, "jobd", "bridge", jb.store_call, admin_url, size["store_calls"])
    attempt(res, "jobd", "enqueue", jb.enqueue, ctx, size["bulk"], size["single"])
    attempt(res, "jobd", "e2e_1", jb.e2e, ctx, size["e2e"])
    attempt(res, "jobd", "e2e_2", jb.e2e, ctx, size["e2e"], daemons=2)
    attempt(res, "jobd", "lat_idle", jb.latency, ctx, size["lat_rate"], size["lat_n"])
    attempt(res, "jobd", "lat_busy", jb.latency, ctx, BUSY_RATE, int(BUSY_RATE * size["busy_s"]))
    attempt(res, "jobd", "lat_idle_direct", jb.latency, ctx, size["lat_rate"], size["lat_n"],
            producer="direct")
    attempt(res, "jobd", "lat_busy_direct", jb.latency, ctx, BUSY_RATE,
            int(BUSY_RATE * size["busy_s"]), producer="direct")
    attempt(res, "jobd", "depth_small", jb.depth, ctx, size["depth_small"])
    attempt(res, "jobd", "depth_big", jb.depth, ctx, size["depth_big"])
    if flow_ok:
        attempt(res, "jobd", "flow_base", jb.e2e, ctx, size["flow"], keys=50)
        attempt(res, "jobd", "flow", jb.e2e, ctx, size["flow"], keys=50,
                extra_queue=jb.FLOW_QUEUE)
    attempt(res, "jobd", "workflows", jb.workflows, ctx, size["workflows"])
    attempt(res, "jobd", "memory", jb.memory, ctx, size["running"])
    if last_rep:
        attempt(res, "jobd", "retention", jb.retention, ctx, size["retention"])


def run_peer(res: Results, peer: str, url: str, meter: StoreMeter, size: dict,
             peak: dict) -> None:
    def enqueue() -> dict:
        peer_once(peer, "clear", url)
        bulk = peer_once(peer, "enqueue-bulk", url, n=size["bulk"], timeout=1200)
        single = peer_once(peer, "enqueue-single", url, n=size["single"], timeout=600)
        concurrent = peer_once(peer, "enqueue-concurrent", url, n=size["single"], producers=16,
                               timeout=600)
        peer_once(peer, "clear", url)
        return {"enqueue_bulk_jobs_per_s": bulk["jobs_per_s"],
                "enqueue_single_jobs_per_s": single["jobs_per_s"],
                "enqueue_concurrent_jobs_per_s": concurrent["jobs_per_s"]}

    def runs(scenario: str) -> bool:
        return scenario in ONLY.get(peer, {scenario})

    if peer == "dbos":
        attempt(res, peer, "workflows", lambda: peer_once(
            peer, "workflows", url, n=size["dbos_wf"], concurrency=200, timeout=900))
        return
    if runs("enqueue"):
        attempt(res, peer, "enqueue", enqueue)
    attempt(res, peer, "e2e_1", peer_e2e, peer, url, meter, size["e2e"], 1, size["peer_max_s"])
    attempt(res, peer, "e2e_2", peer_e2e, peer, url, meter, size["e2e"], 2, size["peer_max_s"])
    attempt(res, peer, "lat_idle", peer_latency, peer, url, size["lat_rate"], size["lat_n"])
    attempt(res, peer, "lat_busy", peer_latency, peer, url, BUSY_RATE,
            int(BUSY_RATE * size["busy_s"]))
    if runs("memory"):
        attempt(res, peer, "memory", peer_memory, peer, url, size["running"])


# -- the table --------------------------------------------------------------------------

ROWS = [
    # (label, scenario, key, format, absolute target for jobd or None); the issue's
    # targets, most of them ratios to a peer, are the TARGETS section below the rows.
    ("0 store call CPU us", "bridge", "store_call_cpu_us", "{:.0f}", None),
    ("0 store call wall us", "bridge", "store_call_wall_us", "{:.0f}", None),
    ("1 bulk enqueue, jobs/s", "enqueue", "enqueue_bulk_jobs_per_s", "{:,.0f}", None),
    ("1 single enqueue, jobs/s", "enqueue", "enqueue_single_jobs_per_s", "{:,.0f}", None),
    ("1 16 clients enqueue, jobs/s", "enqueue", "enqueue_concurrent_jobs_per_s", "{:,.0f}",
     None),
    ("1 single, direct producer", "enqueue", "enqueue_single_direct_jobs_per_s", "{:,.0f}",
     None),
    ("1 16 tasks, a direct producer", "enqueue", "enqueue_concurrent_direct_jobs_per_s", "{:,.0f}",
     None),
    ("2 e2e 1 daemon, jobs/s", "e2e_1", "jobs_per_s", "{:,.0f}", None),
    ("2   daemon CPU s / 1k jobs", "e2e_1", "daemon_cpu_s_per_1k", "{:.3f}", None),
    ("2   store CPU s / 1k jobs", "e2e_1", "pg_cpu_s_per_1k", "{:.3f}", None),
    ("2   store txns / job", "e2e_1", "db_round_trips_per_job", "{:.4f}", ("<=", 0.05)),
    ("2 e2e 2 daemons, jobs/s", "e2e_2", "jobs_per_s", "{:,.0f}", None),
    ("2   daemon CPU s / 1k jobs", "e2e_2", "daemon_cpu_s_per_1k", "{:.3f}", None),
    ("2   store CPU s / 1k jobs", "e2e_2", "pg_cpu_s_per_1k", "{:.3f}", None),
    ("3 idle latency p50 ms", "lat_idle", "p50_ms", "{:.1f}", None),
    ("3 idle latency p95 ms", "lat_idle", "p95_ms", "{:.1f}", None),
    ("3 idle latency p99 ms", "lat_idle", "p99_ms", "{:.1f}", None),
    ("3 at 2,000/s: achieved/s", "lat_busy", "achieved_rate", "{:,.0f}", None),
    ("3 at 2,000/s p50 ms", "lat_busy", "p50_ms", "{:.1f}", None),
    ("3 at 2,000/s p95 ms", "lat_busy", "p95_ms", "{:.1f}", None),
    ("3 at 2,000/s p99 ms", "lat_busy", "p99_ms", "{:.1f}", None),
    ("3 direct producer: idle p50", "lat_idle_direct", "p50_ms", "{:.1f}", None),
    ("3 direct producer: idle p99", "lat_idle_direct", "p99_ms", "{:.1f}", None),
    ("3 direct: 2,000/s p50 ms", "lat_busy_direct", "p50_ms", "{:.1f}", None),
    ("3 direct: 2,000/s p99 ms", "lat_busy_direct", "p99_ms", "{:.1f}", None),
    ("4 claim/s, 10k queued", "depth_small", "claim_jobs_per_s", "{:,.0f}", None),
    ("4 claim/s, big queue", "depth_big", "claim_jobs_per_s", "{:,.0f}", None),
    ("4 retention: table MB", "retention", "table_total_mb", "{:.1f}", None),
    ("4 retention: rows left", "retention", "rows_left", "{:,.0f}", None),
    ("4 retention: dead tuples", "retention", "dead_tuples", "{:,.0f}", None),
    ("5 50 keys, no limits, jobs/s", "flow_base", "jobs_per_s", "{:,.0f}", None),
    ("5 50 keys, limits, jobs/s", "flow", "jobs_per_s", "{:,.0f}", None),
    ("6 suspend+resume, jobs/s", "workflows", "suspend_jobs_per_s", "{:,.0f}", None),
    ("6   daemon CPU ms / job", "workflows", "suspend_daemon_cpu_ms_per_job", "{:.3f}", None),
    ("6   store CPU ms / job", "workflows", "suspend_pg_cpu_ms_per_job", "{:.3f}", None),
    ("6 three-step wf, jobs/s", "workflows", "wf3_jobs_per_s", "{:,.0f}", None),
    ("6   daemon CPU ms / job", "workflows", "wf3_daemon_cpu_ms_per_job", "{:.3f}", None),
    ("6 memoized step, us", "workflows", "memoized_step_us", "{:.1f}", None),
    ("6   load of 200 steps, ms", "workflows", "step_load_ms", "{:.1f}", None),
    ("7 idle RSS MB", "memory", "idle_rss_mb", "{:.1f}", None),
    ("7 RSS, N sleeping jobs MB", "memory", "running_rss_mb", "{:.1f}", None),
    ("7 KB per running job", "memory", "kb_per_running_job", "{:.2f}", ("<=", 10)),
]

PGQUEUER = ("pgqueuer", "pgqueuer b10")  # "pgqueuer at its best": the better of the two
# The performance issue's targets, in its order: (label, numerator, denominator or None,
# op, limit). A side is (systems, scenario, key); with several systems the best median
# counts (the highest throughput, the lowest latency: `op` says which is better for jobd,
# so the peer's best is the one that makes the verdict hardest).
TARGETS = [
    ("bridge: daemon CPU per store call, us", (("jobd",), "bridge", "store_call_cpu_us"),
     None, "<=", 150),
    ("single enqueue, 1 client, jobd / pgqueuer",
     (("jobd",), "enqueue", "enqueue_single_jobs_per_s"),
     (("pgqueuer",), "enqueue", "enqueue_single_jobs_per_s"), ">=", 0.6),
    ("single enqueue, 16 clients, jobd / pgqueuer",
     (("jobd",), "enqueue", "enqueue_concurrent_jobs_per_s"),
     (("pgqueuer",), "enqueue", "enqueue_concurrent_jobs_per_s"), ">=", 2),
    ("e2e 1 daemon, jobd / best pgqueuer", (("jobd",), "e2e_1", "jobs_per_s"),
     (PGQUEUER, "e2e_1", "jobs_per_s"), ">=", 2),
    ("e2e 2 daemons, jobd / best pgqueuer", (("jobd",), "e2e_2", "jobs_per_s"),
     (PGQUEUER, "e2e_2", "jobs_per_s"), ">=", 2),
    ("bulk enqueue, jobd / pgqueuer", (("jobd",), "enqueue", "enqueue_bulk_jobs_per_s"),
     (("pgqueuer",), "enqueue", "enqueue_bulk_jobs_per_s"), ">=", 2),
    ("idle p99, jobd / best pgqueuer", (("jobd",), "lat_idle", "p99_ms"),
     (PGQUEUER, "lat_idle", "p99_ms"), "<=", 1),
    ("2,000/s offered p99, jobd / best pgqueuer", (("jobd",), "lat_busy", "p99_ms"),
     (PGQUEUER, "lat_busy", "p99_ms"), "<=", 1),
    # The direct producer (daemon/producer.py, the producer for applications
    # that share the database): the same targets, for jobd's path that, like
    # pgqueuer's producers, inserts on its own connection. The rows above stay the
    # socket's.
    ("direct: single enqueue, jobd / pgqueuer",
     (("jobd",), "enqueue", "enqueue_single_direct_jobs_per_s"),
     (("pgqueuer",), "enqueue", "enqueue_single_jobs_per_s"), ">=", 0.6),
    ("direct: 16 tasks, jobd / pgqueuer",
     (("jobd",), "enqueue", "enqueue_concurrent_direct_jobs_per_s"),
     (("pgqueuer",), "enqueue", "enqueue_concurrent_jobs_per_s"), ">=", 2),
    ("direct: idle p99, jobd / best pgqueuer", (("jobd",), "lat_idle_direct", "p99_ms"),
     (PGQUEUER, "lat_idle", "p99_ms"), "<=", 1),
    ("direct: 2,000/s p99, jobd / best pgqueuer", (("jobd",), "lat_busy_direct", "p99_ms"),
     (PGQUEUER, "lat_busy", "p99_ms"), "<=", 1),
    ("flow limits that never bind / no limits", (("jobd",), "flow", "jobs_per_s"),
     (("jobd",), "flow_base", "jobs_per_s"), ">=", 0.9),
    ("suspend+resume, jobs/s", (("jobd",), "workflows", "suspend_jobs_per_s"), None,
     ">=", 3000),
    ("three-step wf / jobd's no-op e2e", (("jobd",), "workflows", "wf3_jobs_per_s"),
     (("jobd",), "e2e_1", "jobs_per_s"), ">=", 0.3),
    ("three-step wf, jobd / DBOS", (("jobd",), "workflows", "wf3_jobs_per_s"),
     (("dbos",), "workflows", "wf3_jobs_per_s"), ">=", 10),
    ("idle RSS MB", (("jobd",), "memory", "idle_rss_mb"), None, "<=", 80),
    ("claim with a big queue / 10k queued", (("jobd",), "depth_big", "claim_jobs_per_s"),
     (("jobd",), "depth_small", "claim_jobs_per_s"), ">=", 0.8),
]


def cell(s: dict | None, fmt: str) -> str:
    if s is None:
        return ""
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def verdict(value: float, target: tuple) -> str:
    op, limit = target
    ok = value >= limit if op == ">=" else value <= limit
    return f"{'ok  ' if ok else 'MISS'} {op} {limit:,}"


def _side(res: Results, side: tuple, lower_is_better: bool) -> tuple[float, str] | None:
    systems, scenario, key = side
    found = [(v["median"], s) for s in systems if (v := res.get(s, scenario, key))]
    if not found:
        return None
    return min(found) if lower_is_better else max(found)


def target_rows(res: Results) -> list[list[str]]:
    """[label, measured, verdict] per target; "not measured" where a side is missing."""
    rows = []
    for label, num, den, op, limit in TARGETS:
        # A peer's best (its highest throughput, its lowest latency) is also the setting
        # that makes jobd's ratio hardest to meet.
        a = _side(res, num, lower_is_better=op == "<=")
        b = _side(res, den, lower_is_better=op == "<=") if den else None
        if a is None or (den and b is None):
            rows.append([label, "not measured", ""])
            continue
        if b is None:
            rows.append([label, f"{a[0]:,.1f}", verdict(a[0], (op, limit))])
            continue
        ratio = a[0] / b[0] if b[0] else float("inf")
        shown = f"{ratio:.2f}x ({a[0]:,.1f} / {b[0]:,.1f}"
        shown += f" {b[1]})" if b[1] != "jobd" else ")"
        rows.append([label, shown, verdict(ratio, (op, limit))])
    return rows


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, a rule of dashes under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    rule = ["-" * w for w in widths]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
            for r in [header, rule, *rows]]


def render(res: Results, systems: list[str], reps: int) -> str:
    header = ["scenario", *systems, "jobd target"]
    lines = []
    for label, sc, key, fmt, target in ROWS:
        row = [label]
        for s in systems:
            v = res.get(s, sc, key)
            note = res.notes.get(s, {}).get(sc, "")
            if v and note.startswith("error"):
                row.append(cell(v, fmt) + " [!]")  # some repetitions failed
            elif v:
                row.append(cell(v, fmt))
            else:
                row.append("error [!]" if note.startswith("error") else note[:40] or "-")
        j = res.get("jobd", sc, key)
        row.append(verdict(j["median"], target) if (target and j) else "")
        lines.append(row)
    targets = _columns(["target (performance issue)", "measured (medians)", "verdict"],
                       target_rows(res))
    out = [*_columns(header, lines), f"median (min-max) over {reps} repetition(s)", "",
           *targets]
    for s in systems:
        for sc, note in res.notes.get(s, {}).items():
            if note.startswith("error"):
                out.append(f"[!] {s} {sc}: {note}")
    return "\n".join(out)


def table_from(path: Path) -> str:
    """The table of a committed results file, recomputed from its raw numbers."""
    data = json.loads(path.read_text())
    res = Results()
    res.raw, res.notes = data["raw"], data["notes"]
    systems = data["meta"].get("systems") or [s for s in SYSTEMS if s in res.raw]
    return render(res, systems, data["meta"]["reps"])


if __name__ == "__main__":
    main()
