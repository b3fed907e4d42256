"""What one store call costs the daemon: the real PgStore, its pool and the bridge in
daemon/store/bridge.py, timed from trio over N sequential `store.ping()` calls (one
`SELECT 1` round trip, the cheapest call the store makes). The gap to
bench/bridge_bench.py's bare `SELECT $1` is the store's own bookkeeping (pool, health,
timing observer) plus the bridge.

    JOBD_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/store_call_bench.py [--calls 5000] [--reps 3]

Runs on a scratch database `jobd_sb_<uuid8>` (dropped afterwards) on the server that
URL names; prints wall and CPU µs per call per rep. Raw results go to
bench/results/store-call-<UTC timestamp>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from bench.common import scratch_db  # noqa: E402
from daemon.store import PgStore, bridge  # noqa: E402

_WARMUP = 200


async def measure(url: str, calls: int, reps: int) -> list[tuple[float, float]]:
    out = []
    async with bridge.open_loop():
        store = PgStore(url, pool_min=2, pool_max=4, timeout_s=10)
        await store.connect()
        try:
            for _ in range(_WARMUP):
                await store.ping()
            for _ in range(reps):
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    await store.ping()
                out.append(((time.perf_counter() - wall) / calls * 1e6,
                            (time.process_time() - cpu) / calls * 1e6))
        finally:
            await store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--url", help="server to make the scratch database on"
                    " (default: JOBD_TEST_DATABASE_URL, else the local server)")
    ap.add_argument("--json", action="store_true", help="one JSON line per rep (bench/run.py)")
    args = ap.parse_args()
    admin_url = (args.url or os.environ.get("JOBD_TEST_DATABASE_URL")
                 or "postgresql://postgres@127.0.0.1:5432/postgres")
    with scratch_db(admin_url, "jobd_sb") as url:
        results = trio.run(measure, url, args.calls, args.reps)
    for i, (wall, cpu) in enumerate(results, 1):
        if args.json:
            print(json.dumps({"rep": i, "calls": args.calls, "wall_us": wall, "cpu_us": cpu}),
                  flush=True)
        else:
            print(f"rep {i} store.ping x{args.calls}: wall {wall:7.1f} us/call"
                  f"   cpu {cpu:7.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
