"""jobd's side of the comparison: each function runs one scenario once and returns numbers.

Every scenario starts fresh `jobd run` processes (tests/support.py JobdProcess) on the
bench database of the embedded cluster; jobs are enqueued through jobd's own API (the
control socket client) except where a scenario is about claiming, where rows are
inserted with one `INSERT ... SELECT generate_series` to save time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from bench.common import PgConn, latency_summary, pg_cluster_cpu, proc_cpu, rss_mb, wait_for
from bench.jobd_handlers import SUSPEND_S
from daemon.embedded import EmbeddedPostgres
from daemon.producer import DirectProducer
from protocol.client import connect
from protocol.jobs import JobSpec
from tests.support import ROOT, JobdProcess

MODULES = ["examples.basic", "bench.jobd_handlers"]
UNFINISHED = "state IN ('available', 'scheduled', 'running')"


class Ctx:
    """The bench database, the cluster's postmaster and a monitoring connection."""

    def __init__(self, url: str, monitor_url: str, dbname: str, postmaster: int, workdir: Path):
        self.url, self.dbname, self.postmaster, self.workdir = url, dbname, postmaster, workdir
        self.sql = PgConn(url)
        self.monitor = PgConn(monitor_url)  # on another database: not in our counts
        self._n = 0

    def xacts(self) -> int:
        return self.monitor.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            self.dbname)

    def daemon(self, concurrency: int = 200, extra_queue: dict | None = None,
               retention: dict | None = None, jobs: dict | None = None) -> JobdProcess:
        self._n += 1
        extra = ""
        if retention:
            extra = "[jobs.retention]\n" + "".join(
                f"{k} = {json.dumps(v)}\n" for k, v in retention.items())
        return JobdProcess(self.workdir / f"d{self._n}", self.url, modules=MODULES,
                           queues={"default": {"concurrency": concurrency, **(extra_queue or {})}},
                           jobs=jobs, extra_toml=extra)

    def reset(self) -> None:
        """Each scenario on a fresh queue: no jobs, and no flow-control state left by the
        previous one (its '' key row would make a flow claim look for jobs without a key,
        which the flow scenario has none of; README Known limits)."""
        self.sql.execute("TRUNCATE jobd.jobs, jobd.job_steps")
        self.sql.execute("TRUNCATE jobd.flow_keys, jobd.flow_queues")
        self.sql.execute("DELETE FROM jobd.pauses")

    def insert(self, n: int, kind: str = "noop", args: str = "{}", keys: int = 0) -> None:
        key = f"'k' || (g % {keys})" if keys else "NULL"
        self.sql.execute(
            f"INSERT INTO jobd.jobs (kind, queue, args, key) SELECT $1, 'default', $2::jsonb, {key}"
            " FROM generate_series(1, $3) g", kind, args, n)

    def close(self) -> None:
        self.sql.close()
        self.monitor.close()


@contextmanager
def scratch(prefix: str) -> Iterator[Ctx]:
    """A throwaway embedded cluster with a migrated `jobd` database, for one script."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            ctx = Ctx(cluster.create_database("jobd"), cluster.url("postgres"), "jobd",
                      cluster.pid, Path(tmp) / "w")
            boot = ctx.daemon()
            boot.start()  # applies jobd's migrations
            stop([boot])
            try:
                yield ctx
            finally:
                ctx.close()
        finally:
            cluster.stop()


def stop(daemons: list[JobdProcess]) -> None:
    for d in daemons:
        if d.proc and d.proc.poll() is None:
            d.signal(15)
    for d in daemons:
        try:
            d.wait(60)
        except subprocess.TimeoutExpired:
            d.kill()


def run_client(main: Any, *args: Any) -> Any:
    """A producer's event loop: asyncio on uvloop when installed, as the peers' producers
    run (bench/peers/harness.py --loop uvloop, run.py's default)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return anyio.run(main, *args)
    return anyio.run(main, *args, backend_options={"use_uvloop": True})


def _client_call(sock: Path, fn) -> Any:
    async def main() -> Any:
        async with connect(str(sock)) as c:
            return await fn(c)
    return run_client(main)


def drain(ctx: Ctx, procs: list[JobdProcess], timeout: float, interval: float = 0.1) -> None:
    """Wait until no job is unfinished; on timeout say what is stuck and why."""
    try:
        wait_for(lambda: not ctx.sql.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM jobd.jobs WHERE {UNFINISHED})"), timeout, interval)
    except TimeoutError:
        states = ctx.sql.fetch("SELECT state, count(*) FROM jobd.jobs GROUP BY 1 ORDER BY 1")
        crashes = [e.get("msg", "") for p in procs for e in p.log_events()
                   if e.get("event") == "actor.crashed"]
        raise RuntimeError(f"stuck after {timeout:.0f}s: "
                           + ", ".join(f"{s} {n}" for s, n in states)
                           + (f"; {crashes[0][:120]}" if crashes else "")) from None


# -- 1. enqueue ---------------------------------------------------------------------

def enqueue(ctx: Ctx, bulk: int, single: int, batch: int = 5000, clients: int = 16) -> dict:
    """Bulk batches, one sequential client, then `clients` concurrent socket clients each
    enqueueing one job at a time (what group commit is for)."""
    ctx.reset()
    d = ctx.daemon()
    d.start()
    try:
        cpu: dict[str, float] = {}

        async def bulk_run(c) -> float:
            # CPU per job of the daemon and of Postgres: which one a faster path must cut.
            cpu0, pg0 = proc_cpu(d.proc.pid), pg_cluster_cpu(ctx.postmaster)
            t = time.perf_counter()
            for start in range(0, bulk, batch):
                await c.enqueue_batch([JobSpec(kind="noop", queue="parked")
                                       for _ in range(min(batch, bulk - start))])
            wall = time.perf_counter() - t
            if bulk:
                cpu["enqueue_bulk_daemon_us_per_job"] = 1e6 * (proc_cpu(d.proc.pid) - cpu0) / bulk
                cpu["enqueue_bulk_pg_us_per_job"] = \
                    1e6 * (pg_cluster_cpu(ctx.postmaster) - pg0) / bulk
            return bulk / wall

        async def single_run(c) -> float:
            t = time.perf_counter()
            for _ in range(single):
                await c.enqueue("noop", {}, queue="parked")
            return single / (time.perf_counter() - t)

        async def concurrent_run() -> float:
            async def one(share: int) -> None:
                async with connect(str(d.socket)) as c:
                    for _ in range(share):
                        await c.enqueue("noop", {}, queue="parked")

            shares = [single // clients + (i < single % clients) for i in range(clients)]
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for share in shares:
                    tg.start_soon(one, share)
            return single / (time.perf_counter() - t)

        async def direct_runs() -> dict:
            # The direct producer (daemon/producer.py): an application sharing the
            # database, as pgqueuer's producers are; one connection per producer.
            async with DirectProducer(ctx.url, modules=MODULES, pool_size=1) as p:
                await p.enqueue("noop", {}, queue="parked")  # limits, live queues read once
                t = time.perf_counter()
                for _ in range(single):
                    await p.enqueue("noop", {}, queue="parked")
                one = single / (time.perf_counter() - t)
            # 16 concurrent enqueuers in one process (a web app's requests) share one
            # producer, as they would in an application: its group commit batches them.
            async with DirectProducer(ctx.url, modules=MODULES, pool_size=4) as p:
                await p.enqueue("noop", {}, queue="parked")

                async def share(n: int) -> None:
                    for _ in range(n):
                        await p.enqueue("noop", {}, queue="parked")
                t = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for i in range(clients):
                        tg.start_soon(share, single // clients + (i < single % clients))
                many = single / (time.perf_counter() - t)
            return {"enqueue_single_direct_jobs_per_s": one,
                    "enqueue_concurrent_direct_jobs_per_s": many}

        return {"enqueue_bulk_jobs_per_s": _client_call(d.socket, bulk_run),
                "enqueue_single_jobs_per_s": _client_call(d.socket, single_run),
                "enqueue_concurrent_jobs_per_s": run_client(concurrent_run),
                **run_client(direct_runs), **cpu}
    finally:
        stop([d])
        ctx.reset()


def store_call(admin_url: str, calls: int) -> dict:
    """CPU per `PgStore.ping()` (bench/store_call_bench.py) on this run's cluster."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "store_call_bench.py"), "--calls",
                        str(calls), "--reps", "3", "--url", admin_url, "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError((r.stderr.strip().splitlines() or ["store_call_bench failed"])[-1])
    reps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {"store_call_cpu_us": statistics.median(x["cpu_us"] for x in reps),
            "store_call_wall_us": statistics.median(x["wall_us"] for x in reps)}


# -- 2. end to end (and 5. flow control, which is the same run with keys) ---------------

def e2e(ctx: Ctx, n: int, daemons: int = 1, keys: int = 0,
        extra_queue: dict | None = None, kind: str = "noop", keyless_row: bool = False) -> dict:
    ctx.reset()
    if keyless_row:  # the queue has had jobs without a key
        ctx.sql.execute("INSERT INTO jobd.flow_keys (queue, key) VALUES ('default', '')")
    procs = [ctx.daemon(extra_queue=extra_queue) for _ in range(daemons)]
    for p in procs:
        p.start()
    try:
        _client_call(procs[0].socket, lambda c: c.pause("default"))
        time.sleep(1.0)  # every daemon hears the pause (NOTIFY) before any job exists
        ctx.insert(n, kind=kind, keys=keys)
        time.sleep(1.0)
        early = ctx.sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state <> 'available'")
        if early:
            raise RuntimeError(f"{early} jobs started while the queue was paused")
        polls0 = ctx.sql.statements
        x0, pg0 = ctx.xacts(), pg_cluster_cpu(ctx.postmaster)
        cpu0 = [proc_cpu(p.proc.pid) for p in procs]
        t0 = time.perf_counter()
        _client_call(procs[0].socket, lambda c: c.resume("default"))
        drain(ctx, procs, 60 + n / 50, 0.05)
        # Wall clock: retention (on, as in production) prunes completed rows meanwhile,
        # so started_at/finished_at of the survivors do not span the run.
        wall = time.perf_counter() - t0
        cpu1 = [proc_cpu(p.proc.pid) for p in procs]
        pg1 = pg_cluster_cpu(ctx.postmaster)
        polls = ctx.sql.statements - polls0
    finally:
        stop(procs)
    time.sleep(0.7)  # exiting backends flush their statistics
    x1 = ctx.xacts()
    # The resume and the daemons' shutdown statements remain in the count (a handful).
    return {"jobs_per_s": n / wall,
            "daemon_cpu_s_per_1k": sum(b - a for a, b in zip(cpu0, cpu1, strict=False)) / n * 1000,
            "pg_cpu_s_per_1k": (pg1 - pg0) / n * 1000,
            "db_round_trips_per_job": (x1 - x0 - polls) / n}


# -- 3. latency -------------------------------------------------------------------------

def latency(ctx: Ctx, rate: float, n: int, producer: str = "socket") -> dict:
    """Jobs enqueued at `rate`/s (one call per job when slow, batches each 5 ms when
    fast), through the socket or (`producer="direct"`) the direct producer; each
    carries its client clock reading."""
    ctx.reset()
    d = ctx.daemon(retention={"completed_max_count": 100_000_000})  # keep the results
    d.start()
    try:
        time.sleep(1.0)

        async def paced(c) -> float:
            sent, tick = 0, 0.005
            t0 = time.perf_counter()
            while sent < n:
                due = min(n, int((time.perf_counter() - t0) * rate) + 1)
                if due - sent == 1:
                    await c.enqueue("bench.lat", {"t": time.time()})
                elif due > sent:
                    now = time.time()
                    await c.enqueue_batch([JobSpec(kind="bench.lat", args={"t": now})
                                           for _ in range(due - sent)])
                sent = max(sent, due)
                wait = t0 + sent / rate - time.perf_counter() if rate < 1 / tick else tick
                await anyio.sleep(max(0.0, wait))
            return sent / (time.perf_counter() - t0)

        if producer == "direct":
            async def direct() -> float:
                async with DirectProducer(ctx.url, modules=MODULES, pool_size=1) as p:
                    return await paced(_DirectAsClient(p))
            achieved = run_client(direct)
        else:
            achieved = _client_call(d.socket, paced)
        drain(ctx, [d], 120)
        ms = [r[0] for r in ctx.sql.fetch(
            "SELECT (result->>'lat_ms')::float8 FROM jobd.jobs WHERE kind = 'bench.lat'")]
    finally:
        stop([d])
    return {**latency_summary(ms), "achieved_rate": achieved}


class _DirectAsClient:
    """The direct producer behind the two calls `latency` makes of a socket client."""

    def __init__(self, producer: DirectProducer):
        self._p = producer

    async def enqueue(self, kind: str, args: dict) -> Any:
        return await self._p.enqueue(kind, args)

    async def enqueue_batch(self, jobs: list[JobSpec]) -> Any:
        return await self._p.enqueue_many(jobs)


# -- 4. depth and retention ---------------------------------------------------------------

def depth(ctx: Ctx, queued: int, measured: int = 9000, warmup: int = 1000) -> dict:
    """Claim throughput at the head of a queue `queued` deep (rows inserted by SQL)."""
    ctx.reset()
    ctx.insert(queued)
    ctx.sql.execute("VACUUM ANALYZE jobd.jobs")
    d = ctx.daemon(retention={"completed_max_count": 100_000_000})
    d.start(wait=False)
    try:
        wait_for(lambda: ctx.sql.fetchval(
            "SELECT count(*) FROM jobd.jobs WHERE state IN ('running', 'completed')")
            >= measured, 600, 0.2)
    finally:
        stop([d])
    a, b = (ctx.sql.fetchval("SELECT started_at FROM jobd.jobs WHERE started_at IS NOT NULL"
                             " ORDER BY started_at OFFSET $1 LIMIT 1", k)
            for k in (warmup, measured - 1))
    ctx.reset()
    return {"claim_jobs_per_s": (measured - 1 - warmup) / (b - a).total_seconds()}


def retention(ctx: Ctx, n: int) -> dict:
    """n jobs through one daemon with default retention; then the table's size."""
    ctx.reset()
    ctx.sql.execute("VACUUM FULL jobd.jobs")
    ctx.insert(n)
    d = ctx.daemon()
    d.start()
    try:
        t = time.perf_counter()
        drain(ctx, [d], 120 + n / 1000, 0.5)
        wall = time.perf_counter() - t
        time.sleep(12)  # two reaper passes (jobs.reaper_interval = 5s) and stats flushes
        row = ctx.sql.fetch(
            "SELECT pg_total_relation_size('jobd.jobs'), pg_relation_size('jobd.jobs'),"
            " n_live_tup, n_dead_tup, autovacuum_count"
            " FROM pg_stat_user_tables WHERE relid = 'jobd.jobs'::regclass")[0]
        rows = ctx.sql.fetchval("SELECT count(*) FROM jobd.jobs")
    finally:
        stop([d])
    ctx.reset()
    return {"jobs": n, "jobs_per_s_incl_startup": n / wall,
            "table_total_mb": row[0] / 2**20, "table_heap_mb": row[1] / 2**20,
            "rows_left": rows, "dead_tuples": row[3], "autovacuums": row[4]}


# -- 6. workflows -------------------------------------------------------------------------

def workflows(ctx: Ctx, n: int, steps: int = 200) -> dict:
    """n jobs that each sleep durably (suspend, free the slot, get claimed again and
    finish) drained like e2e: the CPU per job is the cost of a suspend/resume, and the
    rate is n over the wall clock less the one sleep every job waits out; then n
    three-step workflows (`bench.wf3`) end to end; then 20 jobs with `steps` steps, whose
    second run replays them from one load."""
    out = {}
    for label, kind, count, args in (("suspend", "bench.wf", n, "{}"),
                                     ("wf3", "bench.wf3", n, "{}"),
                                     ("steps", "bench.wf", 20, f'{{"steps": {steps}}}')):
        ctx.reset()
        d = ctx.daemon()
        d.start()
        try:
            _client_call(d.socket, lambda c: c.pause("default"))
            time.sleep(1.0)
            ctx.insert(count, kind=kind, args=args)
            cpu0, pg0 = proc_cpu(d.proc.pid), pg_cluster_cpu(ctx.postmaster)
            t0 = time.perf_counter()
            _client_call(d.socket, lambda c: c.resume("default"))
            drain(ctx, [d], 60 + count / 100, 0.05)
            wall = time.perf_counter() - t0
            cpu1, pg1 = proc_cpu(d.proc.pid), pg_cluster_cpu(ctx.postmaster)
            if label == "suspend":
                out.update(suspend_jobs_per_s=count / max(1e-3, wall - SUSPEND_S),
                           suspend_daemon_cpu_ms_per_job=(cpu1 - cpu0) / count * 1000,
                           suspend_pg_cpu_ms_per_job=(pg1 - pg0) / count * 1000)
            elif label == "wf3":
                out.update(wf3_jobs_per_s=count / wall,
                           wf3_daemon_cpu_ms_per_job=(cpu1 - cpu0) / count * 1000)
            else:
                rows = ctx.sql.fetch(
                    "SELECT (result->>'replay_us_per_step')::float8, (result->>'load_ms')::float8"
                    " FROM jobd.jobs WHERE kind = 'bench.wf' AND state = 'completed'")
                out.update(memoized_step_us=statistics.median(r[0] for r in rows),
                           step_load_ms=statistics.median(r[1] for r in rows))
        finally:
            stop([d])
    ctx.reset()
    return out


# -- 5. flow control ----------------------------------------------------------------------

FLOW_QUEUE = {"key_concurrency": 1000, "rate": "1000000/s"}


def flow_control_landed(workdir: Path) -> tuple[bool, str]:
    probe = JobdProcess(workdir / "flowprobe", "postgresql://x@/x", queues={
        "default": {"concurrency": 200, **FLOW_QUEUE}})
    r = subprocess.run([sys.executable, "-m", "daemon.main", "check-config", "--config",
                        str(probe.config)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


# -- 7. memory ----------------------------------------------------------------------------

def memory(ctx: Ctx, running: int) -> dict:
    ctx.reset()
    d = ctx.daemon(concurrency=running)
    d.start()
    try:
        time.sleep(2.0)
        idle = rss_mb(d.proc.pid)
        ctx.insert(running, kind="sleep", args='{"seconds": 600, "steps": 1}')
        wait_for(lambda: ctx.sql.fetchval(
            "SELECT count(*) FROM jobd.jobs WHERE state = 'running'") >= running, 300, 0.2)
        time.sleep(2.0)
        busy = rss_mb(d.proc.pid)
    finally:
        d.kill()  # draining would wait for the sleepers
        ctx.sql.execute("DELETE FROM jobd.daemons")
        ctx.reset()
    return {"idle_rss_mb": idle, "running_rss_mb": busy,
            "kb_per_running_job": (busy - idle) * 1024 / running}
