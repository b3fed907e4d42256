"""DBOS (dbos-transact) driven through its documented API, for the workflow row only:
three-step workflows (each step a no-op) started durably and run by this process, the
same shape as jobd's `bench.wf3`. `DBOS.start_workflow` is its fastest way in (1.3x a
DBOS Queue with worker_concurrency=200 and a 10 ms poll here, with sync or async
functions alike), so that is the one measured.

    python bench/peers/dbos_peer.py setup|workflows --url URL [--n N] [--concurrency C]

`workflows` enqueues N workflows, waits for every result and reports workflows/s and
this process's CPU. DBOS keeps its state in the system database the URL names.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time


def emit(tag: str, payload: object) -> None:
    print(f"@{tag} {json.dumps(payload)}", flush=True)


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["setup", "clear", "workflows"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=200)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from dbos import DBOS, DBOSConfig

    DBOS(config=DBOSConfig(name="bench", system_database_url=args.url, log_level="ERROR",
                           max_executor_threads=args.concurrency, sys_db_pool_size=40))
    @DBOS.step()
    def step(i: int) -> int:
        return i

    @DBOS.workflow()
    def wf3() -> int:
        return step(1) + step(2) + step(3)

    DBOS.launch()
    try:
        if args.mode in ("setup", "clear"):
            emit("result", {})
            return
        wf3()  # warm: the first workflow pays for imports and prepared statements
        cpu0, t0 = cpu_self(), time.perf_counter()
        handles = [DBOS.start_workflow(wf3) for _ in range(args.n)]
        for h in handles:
            assert h.get_result() == 6
        wall = time.perf_counter() - t0
        emit("result", {"wf3_jobs_per_s": args.n / wall,
                        "wf3_daemon_cpu_ms_per_job": (cpu_self() - cpu0) / args.n * 1000})
    except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, as the other peers do
        emit("error", {"error": f"{type(exc).__name__}: {exc}"[:500]})
        sys.exit(1)
    finally:
        DBOS.destroy(destroy_registry=True)


if __name__ == "__main__":
    main()
