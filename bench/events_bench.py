"""Events: how fast they are sent (one at a time and batched, through the socket and
from SQL) and how fast the jobs they start run. Each event starts one `bench.tick` job
(bench/jobd_handlers.py), keyed by user, with a cancel_on subscription on another event.

    python bench/events_bench.py [--events 20000] [--clients 8]

Prints a table and writes the raw numbers to bench/results/events-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PgConn  # noqa: E402
from daemon.embedded import EmbeddedPostgres  # noqa: E402
from protocol.client import SyncClient  # noqa: E402
from protocol.events import EventSpec  # noqa: E402
from protocol.jobs import JobSpec  # noqa: E402
from tests.support import JobdProcess  # noqa: E402

BATCH = 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=20_000, help="events per batched run")
    p.add_argument("--single", type=int, default=3000, help="events sent one at a time")
    p.add_argument("--clients", type=int, default=8)
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="jobd-events-bench-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            results = run(cluster.create_database("bench"), Path(tmp), opts)
        finally:
            cluster.stop()
    results["cpus"] = os.cpu_count()
    results["load_average_1m_at_end"] = os.getloadavg()[0]  # the machine is shared
    results["command"] = "python bench/events_bench.py " + " ".join(sys.argv[1:])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"events-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:44} {value:,.1f}" if isinstance(value, float) else f"{key:44} {value}")
    print(f"raw: {out.relative_to(ROOT)}")


def run(url: str, tmp: Path, opts: argparse.Namespace) -> dict[str, object]:
    daemon = JobdProcess(tmp / "d", url, modules=["examples.basic", "bench.jobd_handlers"],
                         queues={"events": {"concurrency": 50, "claim_batch": 500}},
                         jobs={"retention.completed_max_count": 10_000_000,
                               "retention.completed_max_age": "7d"})
    daemon.start()
    sql = PgConn(url)
    results: dict[str, object] = {}
    try:
        with SyncClient(str(daemon.socket)) as client:
            client.send_event("bench/tick", {"n": -1})  # warm up
            n = opts.single
            t = time.perf_counter()
            for i in range(n):
                client.send_event("bench/tick", {"n": i, "user": f"u{i % 100}"})
            results["single_1_client_events_per_s"] = n / (time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(n):
                client.send_event("bench/tick", {"n": i, "user": f"u{i % 100}"},
                                  idempotency_key=f"single:{i}")
            results["single_1_client_with_id_events_per_s"] = n / (time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(n):  # the baseline under the same load: the job alone
                client.enqueue("bench.tick", {"n": i, "user": f"u{i % 100}"})
            results["single_1_client_enqueue_baseline_jobs_per_s"] = n / (time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(n):  # every one a repeat: answered, nothing started
                client.send_event("bench/tick", {"n": i}, idempotency_key=f"single:{i}")
            results["single_1_client_repeats_per_s"] = n / (time.perf_counter() - t)
        results[f"single_{opts.clients}_clients_events_per_s"] = _concurrent(daemon, opts)
        wait_done(sql, "bench.tick")

        total = opts.events
        with SyncClient(str(daemon.socket)) as client:
            before = _count(sql, "bench.tick")
            t0 = time.perf_counter()
            for start in range(0, total, BATCH):
                client.send_events([EventSpec(name="bench/tick",
                                              data={"n": i, "user": f"u{i % 100}"},
                                              idempotency_key=f"batch:{i}")
                                    for i in range(start, min(total, start + BATCH))])
            sent_s = time.perf_counter() - t0
            results[f"batched_{BATCH}_events_per_s"] = total / sent_s
            done_s = wait_done(sql, "bench.tick", t0)
            results["batched_started_jobs"] = _count(sql, "bench.tick") - before
            results["batched_jobs_completed_per_s_from_first_send"] = total / done_s
            wait_done(sql, "bench.tick")
            t = time.perf_counter()
            for start in range(0, total, BATCH):  # the baseline: the jobs alone
                client.enqueue_batch([JobSpec(kind="bench.tick",
                                              args={"n": i, "user": f"u{i % 100}"})
                                      for i in range(start, min(total, start + BATCH))])
            results[f"batched_{BATCH}_enqueue_baseline_jobs_per_s"] = \
                total / (time.perf_counter() - t)
        t = time.perf_counter()
        n = opts.single
        for i in range(n):
            sql.fetchval("SELECT event_id FROM jobd.send_event('bench/tick', $1::jsonb)",
                         json.dumps({"n": i, "user": f"s{i % 100}"}))
        results["sql_1_connection_events_per_s"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):  # the baseline: the job alone, through the same jobd.enqueue
            sql.fetchval("SELECT jobd.enqueue('bench.tick', $1::jsonb, queue => 'events')",
                         json.dumps({"n": i, "user": f"s{i % 100}"}))
        results["sql_1_connection_enqueue_baseline_jobs_per_s"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):  # no subscription: the event row alone
            sql.fetchval("SELECT event_id FROM jobd.send_event('bench/nobody', $1::jsonb)",
                         json.dumps({"n": i}))
        results["sql_1_connection_unsubscribed_events_per_s"] = n / (time.perf_counter() - t)
        wait_done(sql, "bench.tick")
        results.update(_in_postgres(sql, 2000))
        results["events_stored"] = sql.fetchval("SELECT count(*) FROM jobd.events")
    finally:
        sql.close()
        daemon.signal(15)
        daemon.wait(60)
    return results


def _in_postgres(sql: PgConn, n: int) -> dict[str, float]:
    """Postgres' own cost per event: n calls in one statement, so no round trip or
    commit is counted. The cancel's cost grows with the kind's jobs (it reads them by
    the jobs_kind index and compares args), so their count is reported with it."""
    calls = {
        "enqueue_baseline": "count(jobd.enqueue('bench.tick', jsonb_build_object('n', i, "
                            "'user', 'p' || (i % 100)), queue => 'events'))",
        "send_event_unsubscribed": "count(jobd.send_event('bench/nobody', "
                                   "jsonb_build_object('n', i)))",
        "send_event_one_subscriber": "count(jobd.send_event('bench/tick', jsonb_build_object("
                                     "'n', i, 'user', 'p' || (i % 100))))",
        "send_event_one_subscriber_with_id": "count(jobd.send_event('bench/tick', "
                                             "jsonb_build_object('n', i, 'user', 'p' || (i % 100)), "
                                             "'pg:' || i))",
        "send_event_cancel_matching_nothing": "count(jobd.send_event('bench/untick', "
                                              "jsonb_build_object('user', 'nobody' || i)))",
    }
    out: dict[str, float] = {}
    for name, call in calls.items():
        t = time.perf_counter()
        sql.fetchval(f"SELECT {call} FROM generate_series(1, $1) i", n)
        out[f"in_postgres_{name}_us"] = (time.perf_counter() - t) / n * 1e6
    out["in_postgres_cancel_kind_jobs"] = float(_count(sql, "bench.tick"))
    return out


def _concurrent(daemon: JobdProcess, opts: argparse.Namespace) -> float:
    per = opts.single // opts.clients

    def sender(c: int) -> None:
        with SyncClient(str(daemon.socket)) as client:
            for i in range(per):
                client.send_event("bench/tick", {"n": i, "user": f"c{c}"})

    threads = [threading.Thread(target=sender, args=(c,)) for c in range(opts.clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return per * opts.clients / (time.perf_counter() - t)


def _count(sql: PgConn, kind: str) -> int:
    return sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE kind = $1", kind)


def wait_done(sql: PgConn, kind: str, t0: float | None = None) -> float:
    deadline = time.monotonic() + 600
    while sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE kind = $1 AND state <> 'completed'",
                       kind) and time.monotonic() < deadline:
        time.sleep(0.05)
    return time.perf_counter() - (t0 or time.perf_counter())


if __name__ == "__main__":
    main()
