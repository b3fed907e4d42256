"""What one flow-controlled claim (jobd.claim_flow) costs as a queue's keys grow.

    python -m bench.flow_claim_bench [--url postgresql://...] [--keys 10000,100000]

Per key count, on a fresh database each time:
  idle     N key rows whose jobs are long finished, 10 live keys with 2,000 jobs each:
           1,000 claims of 10 (does the cost follow the live keys or all rows?)
  one-off  N keys with one available job each: 1,000 claims of 10
  empty    N idle key rows and nothing to run: 1,000 claims, and the flow_keys rows
           they rewrote
Prints ms per claim (median and p95) and rows written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import asyncpg

from daemon.store import migrate

LIMITS = json.dumps({"default": {"concurrency": 1000}, "keys": {}})


async def fresh(admin_url: str) -> tuple[str, str]:
    name = f"jobd_flowbench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    base, _, _ = admin_url.rpartition("/")
    return name, f"{base}/{name}"


async def drop(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


async def setup(conn: asyncpg.Connection, scenario: str, n: int) -> None:
    await migrate.apply(conn)
    if scenario in ("idle", "empty"):
        await conn.execute(
            "INSERT INTO jobd.flow_keys (queue, key, served_at) "
            "SELECT 'crawl', 'idle-' || g, now() - interval '1 day' "
            "FROM generate_series(1, $1) g", n)
    if scenario == "idle":
        await conn.execute(
            "INSERT INTO jobd.jobs (queue, kind, key) SELECT 'crawl', 'noop', 'live-' || (g % 10) "
            "FROM generate_series(1, 20000) g")
    if scenario == "one-off":
        await conn.execute(
            "INSERT INTO jobd.jobs (queue, kind, key) SELECT 'crawl', 'noop', 'user-' || g "
            "FROM generate_series(1, $1) g", n)
    await conn.execute("VACUUM ANALYZE jobd.jobs")
    await conn.execute("VACUUM ANALYZE jobd.flow_keys")


async def run(url: str, scenario: str, n: int, claims: int) -> dict:
    conn = await asyncpg.connect(url)
    try:
        await setup(conn, scenario, n)
        versions = await conn.fetch("SELECT key, xmin::text AS x FROM jobd.flow_keys")
        times = []
        taken = 0
        for _ in range(claims):
            t = time.perf_counter()
            got = await conn.fetchval(
                "SELECT count(*) FROM jobd.claim_flow('crawl', 10, 'bench', 60, '{noop}', "
                "'{}', NULL, $1::jsonb)", LIMITS)
            times.append(time.perf_counter() - t)
            taken += got
        after = {r["key"]: r["x"] for r in await conn.fetch(
            "SELECT key, xmin::text AS x FROM jobd.flow_keys")}
        rewritten = sum(1 for r in versions if after.get(r["key"]) not in (None, r["x"]))
        times.sort()
        return {"scenario": scenario, "keys": n, "claims": claims, "taken": taken,
                "median_ms": round(statistics.median(times) * 1000, 3),
                "p95_ms": round(times[int(len(times) * 0.95)] * 1000, 3),
                "key_rows_rewritten": rewritten}
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keys", default="10000,100000")
    parser.add_argument("--claims", type=int, default=1000)
    parser.add_argument("--scenarios", default="idle,one-off,empty")
    args = parser.parse_args()
    for n in [int(k) for k in args.keys.split(",")]:
        for scenario in args.scenarios.split(","):
            name, url = await fresh(args.url)
            try:
                print(json.dumps(await run(url, scenario, n, args.claims)), flush=True)
            finally:
                await drop(args.url, name)


if __name__ == "__main__":
    asyncio.run(main())
