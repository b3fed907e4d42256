"""Single enqueues over the socket, one sequential client against N concurrent ones.

Measures the tree at `--tree` (its daemon, its bench helpers), so the same script
compares two checkouts; run it alternating between them in one session:

    python bench/enqueue_clients.py --tree /work/main --clients 16 --rounds 2

Each line printed is one round as JSON: jobs/s for 1 client and for N, and Postgres
transactions per job in the N-client run, the daemon's start and stop included (group
commit brings it under 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--single", type=int, default=2000, help="jobs for the one client")
    ap.add_argument("--many", type=int, default=8000, help="jobs for the N clients, in all")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import anyio

    from bench import jobd_bench as jb
    from protocol.client import connect

    async def clients(sock: Path, n: int, jobs: int) -> float:
        async def one(share: int) -> None:
            async with connect(str(sock)) as c:
                for _ in range(share):
                    await c.enqueue("noop", {})

        shares = [jobs // n + (i < jobs % n) for i in range(n)]
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for share in shares:
                tg.start_soon(one, share)
        return jobs / (time.perf_counter() - started)

    def run(ctx: jb.Ctx, n: int, jobs: int) -> tuple[float, int]:
        """jobs/s, and the database's transactions meanwhile (read once the daemon has
        exited: a backend reports its counts at exit at the latest)."""
        ctx.reset()
        before = ctx.xacts()
        d = ctx.daemon()
        d.start()
        try:
            # Into a served queue, paused: nothing runs, and the enqueue needs no
            # "is anyone serving this queue" round trip.
            jb._client_call(d.socket, lambda c: c.pause("default"))
            rate = anyio.run(clients, d.socket, n, jobs, backend_options={"use_uvloop": True})
        finally:
            jb.stop([d])
        return rate, ctx.xacts() - before

    with jb.scratch("jobd-enq-") as ctx:
        for _ in range(args.rounds):
            one, _ = run(ctx, 1, args.single)
            many, xacts = run(ctx, args.clients, args.many)
            print(json.dumps({"tree": str(args.tree), "clients_1_jobs_per_s": round(one),
                              f"clients_{args.clients}_jobs_per_s": round(many),
                              "xacts_per_job": round(xacts / args.many, 3)}), flush=True)

if __name__ == "__main__":
    main()
