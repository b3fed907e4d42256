"""HTTP handlers: jobd's CPU per call and jobs/s with 100 calls in flight, against a
local no-op endpoint, beside the same number of Python no-op jobs at the same
concurrency (alternating, one embedded cluster, so both see the same machine).

    python -m bench.http_handlers [--jobs 5000] [--reps 3] [--concurrency 100]

The endpoint is a separate process (a bare asyncio HTTP/1.1 server answering `{}` on
kept-alive connections), so its CPU is not jobd's. The raw results are written to
bench/results/http-handlers-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402
from bench.common import CLK_TCK, _stat_fields, pg_cluster_cpu  # noqa: E402
from tests.support import JobdProcess  # noqa: E402

SECRET = "whsec_YmVuY2gtc2VjcmV0LWZvci1odHRwLWhhbmRsZXJz"
_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _serve(port: int) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                writer.write(_ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port, backlog=1024)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def endpoint() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "0"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, int(line.split()[1])


def daemon(ctx: jb.Ctx, port: int, concurrency: int, secret: Path) -> JobdProcess:
    ctx._n += 1
    extra = ('[http]\nallow_hosts = ["127.0.0.1"]\n'
             f'per_origin = {concurrency}\n'
             '[http.kinds."bench.http"]\n'
             f'url = "http://127.0.0.1:{port}/noop"\nqueue = "default"\n'
             f'secret_file = "{secret}"\ntimeout = "30s"\n')
    return JobdProcess(ctx.workdir / f"d{ctx._n}", ctx.url, modules=jb.MODULES,
                       queues={"default": {"concurrency": concurrency}}, extra_toml=extra)


def user_system(pid: int) -> tuple[float, float]:
    """jobd's user and system CPU: on loopback the kernel's TCP work for each send is
    system time of the sender, so it is shown apart."""
    f = _stat_fields(pid)
    return int(f[11]) / CLK_TCK, int(f[12]) / CLK_TCK


def run(ctx: jb.Ctx, kind: str, n: int, port: int, concurrency: int, secret: Path) -> dict:
    ctx.reset()
    proc = daemon(ctx, port, concurrency, secret)
    proc.start()
    try:
        jb._client_call(proc.socket, lambda c: c.pause("default"))
        time.sleep(1.0)
        ctx.insert(n, kind=kind)
        time.sleep(0.5)
        pg0, (user0, sys0) = pg_cluster_cpu(ctx.postmaster), user_system(proc.proc.pid)
        t0 = time.perf_counter()
        jb._client_call(proc.socket, lambda c: c.resume("default"))
        jb.drain(ctx, [proc], 60 + n / 50, 0.05)
        wall = time.perf_counter() - t0
        (user1, sys1), pg1 = user_system(proc.proc.pid), pg_cluster_cpu(ctx.postmaster)
        failed = ctx.sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state <> 'completed'")
    finally:
        jb.stop([proc])
    if failed:
        raise RuntimeError(f"{failed} {kind} jobs did not complete")
    return {"kind": kind, "jobs": n, "jobs_per_s": n / wall,
            "daemon_cpu_us_per_job": 1e6 * (user1 - user0 + sys1 - sys0) / n,
            "daemon_user_us_per_job": 1e6 * (user1 - user0) / n,
            "daemon_system_us_per_job": 1e6 * (sys1 - sys0) / n,
            "pg_cpu_us_per_job": 1e6 * (pg1 - pg0) / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        asyncio.run(_serve(args.serve))
        return
    server, port = endpoint()
    runs: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp, jb.scratch("jobd-http-") as ctx:
            secret = Path(tmp) / "bench.secret"
            secret.write_text(SECRET + "\n")
            for _ in range(args.reps):
                for kind in ("noop", "bench.http"):
                    r = run(ctx, kind, args.jobs, port, args.concurrency, secret)
                    runs.append(r)
                    print({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()},
                          flush=True)
    finally:
        server.kill()
    summary = {}
    for kind in ("noop", "bench.http"):
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {m: statistics.median(r[m] for r in mine)
                         for m in ("jobs_per_s", "daemon_cpu_us_per_job", "daemon_user_us_per_job",
                                   "daemon_system_us_per_job", "pg_cpu_us_per_job")}
    overhead = (summary["bench.http"]["daemon_cpu_us_per_job"]
                - summary["noop"]["daemon_cpu_us_per_job"])
    print(f"median: HTTP kind {summary['bench.http']['jobs_per_s']:,.0f} jobs/s, "
          f"{summary['bench.http']['daemon_cpu_us_per_job']:,.0f} us jobd CPU per job; "
          f"Python no-op {summary['noop']['jobs_per_s']:,.0f} jobs/s, "
          f"{summary['noop']['daemon_cpu_us_per_job']:,.0f} us; the call costs "
          f"{overhead:,.0f} us of jobd CPU")
    out = ROOT / "bench" / "results" / f"http-handlers-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps({
        "command": "python -m bench.http_handlers " + " ".join(sys.argv[1:]),
        "jobs": args.jobs, "reps": args.reps, "concurrency": args.concurrency,
        "runs": runs, "median": summary, "http_overhead_daemon_cpu_us_per_job": overhead,
    }, indent=2) + "\n")
    print(f"raw results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
