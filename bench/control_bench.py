"""Control-plane and metrics numbers: `get` round trip over the socket and over HTTP,
batch enqueue through the client, and /metrics scrape time and size with 20 queues and
200 flow keys.

    python bench/control_bench.py
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from daemon.embedded import EmbeddedPostgres  # noqa: E402
from protocol.client import connect  # noqa: E402
from protocol.jobs import JobSpec  # noqa: E402
from tests.support import JobdProcess, Sql  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="jobd-control-bench-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            run(cluster.create_database("bench"), Path(tmp))
        finally:
            cluster.stop()


def run(url: str, tmp: Path) -> None:
    port = free_port()
    token = tmp / "token"
    token.write_text("bench-token\n")
    queues = {f"q{i:02d}": {"concurrency": 10, "key_concurrency": 5, "rate": "1000/s"}
              for i in range(20)}
    daemon = JobdProcess(tmp / "d", url, queues=queues,
                         control={"http": f"127.0.0.1:{port}", "token_file": str(token)},
                         extra_toml='[metrics]\nkey_series_limit = 200\nleader_interval = "1s"\n')
    daemon.start()
    try:
        results = {}

        async def socket_numbers() -> None:
            async with connect(str(daemon.socket)) as client:
                done = await client.enqueue("noop", {}, queue="q00")
                n = 2000
                t = time.perf_counter()
                for _ in range(n):
                    await client.get(done.id)
                results["get_socket_us"] = (time.perf_counter() - t) / n * 1e6
                await anyio.to_thread.run_sync(http_get, done.id)
                specs = [JobSpec(kind="noop", queue=f"q{i % 20:02d}", key=f"k{i % 200}")
                         for i in range(50_000)]
                t = time.perf_counter()
                for start in range(0, len(specs), 5000):
                    await client.enqueue_batch(specs[start:start + 5000])
                results["batch_enqueue_client_jobs_per_s"] = len(specs) / (time.perf_counter() - t)

        def http_get(job_id: int) -> None:
            headers = {"Authorization": "Bearer bench-token"}
            get_url = f"http://127.0.0.1:{port}/v1/jobs/{job_id}"
            times = []
            for _ in range(500):
                t = time.perf_counter()
                with urllib.request.urlopen(urllib.request.Request(get_url, headers=headers)) as r:
                    r.read()
                times.append(time.perf_counter() - t)
            results["get_http_us_median"] = statistics.median(times) * 1e6

        anyio.run(socket_numbers)

        sql = Sql(url)
        deadline = time.monotonic() + 120
        while sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") < 50_001:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(2.5)  # a leader refresh of the queue and key gauges
        sizes, scrape = [], []
        for _ in range(20):
            t = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                body = r.read()
            scrape.append(time.perf_counter() - t)
            sizes.append(len(body))
        text = body.decode()
        results["metrics_scrape_ms_median"] = statistics.median(scrape) * 1000
        results["metrics_bytes"] = sizes[-1]
        results["metrics_series"] = sum(1 for ln in text.splitlines() if ln and ln[0] != "#")
        results["metrics_key_series"] = sum(
            1 for ln in text.splitlines() if ln.startswith("jobd_key_running_jobs{"))
    finally:
        daemon.signal(15)
        daemon.wait(60)
    for key, value in results.items():
        print(f"{key:36} {value:,.1f}" if isinstance(value, float) else f"{key:36} {value}")


if __name__ == "__main__":
    main()
