"""The cost of tracing per job: no-op jobs end to end on one daemon, tracing off against on.

Modes, alternated round by round on one throwaway cluster:
  off         the default ([tracing] absent): no span is built
  on          [tracing] enabled, sample_ratio 1.0, every attempt's span exported over
              OTLP/HTTP to a receiver in this process (127.0.0.1), jobs without a traceparent
  on_parent   as `on`, every job carrying a producer traceparent (the context is parsed)
  on_ratio0   enabled, sample_ratio 0: spans are started but none is recorded or exported

Daemon CPU is the jobd process's (its export thread included), read before the queue is
resumed and after every span has reached the receiver (or 20 s passed), so the export
tail is counted; jobs/s is to the last job finished. Spans the receiver never got (a
full export queue drops them) are reported, since a dropped span costs less.

    .venv/bin/python -m bench.tracing_cost --jobs 20000 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.common import pg_cluster_cpu, proc_cpu, wait_for
from bench.jobd_bench import Ctx, _client_call, drain, scratch, stop
from tests.support import ROOT, JobdProcess

MODES = ("off", "on", "on_parent", "on_ratio0")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Receiver:
    """Counts the spans OTLP/HTTP requests carry."""

    def __init__(self) -> None:
        self.spans = 0
        lock, outer = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with lock:
                    outer.spans += n
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def tracing_toml(mode: str, endpoint: str) -> str:
    if mode == "off":
        return ""
    ratio = 0.0 if mode == "on_ratio0" else 1.0
    return f'[tracing]\nenabled = true\nendpoint = "{endpoint}"\nsample_ratio = {ratio}\n'


def run(ctx: Ctx, mode: str, n: int, receiver: Receiver, round_no: int) -> dict[str, Any]:
    ctx.reset()
    proc = JobdProcess(ctx.workdir / f"{mode}-{round_no}", ctx.url, modules=["examples.basic",
                       "bench.jobd_handlers"], queues={"default": {"concurrency": 200}},
                       extra_toml=tracing_toml(mode, receiver.endpoint))
    proc.start()
    try:
        _client_call(proc.socket, lambda c: c.pause("default"))
        time.sleep(1.0)
        ctx.insert(n, kind="noop")
        if mode == "on_parent":
            ctx.sql.execute("UPDATE jobd.jobs SET traceparent = $1", TRACEPARENT)
        time.sleep(0.5)
        spans0 = receiver.spans
        cpu0, pg0 = proc_cpu(proc.proc.pid), pg_cluster_cpu(ctx.postmaster)
        t0 = time.perf_counter()
        _client_call(proc.socket, lambda c: c.resume("default"))
        drain(ctx, [proc], 60 + n / 50, 0.05)
        wall = time.perf_counter() - t0
        expected = 0 if mode in ("off", "on_ratio0") else n
        try:
            wait_for(lambda: receiver.spans - spans0 >= expected, 20.0, 0.1)
        except TimeoutError:
            pass
        cpu1, pg1 = proc_cpu(proc.proc.pid), pg_cluster_cpu(ctx.postmaster)
        received = receiver.spans - spans0
    finally:
        stop([proc])
    return {"mode": mode, "round": round_no, "jobs": n, "jobs_per_s": n / wall,
            "daemon_cpu_us_per_job": (cpu1 - cpu0) / n * 1e6,
            "pg_cpu_us_per_job": (pg1 - pg0) / n * 1e6, "spans_received": received,
            "spans_missing": max(0, expected - received)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    modes = args.modes.split(",")
    receiver = Receiver()
    runs: list[dict[str, Any]] = []
    with scratch("jobd-tracing-bench-") as ctx:
        for r in range(args.reps):
            for mode in modes:
                result = run(ctx, mode, args.jobs, receiver, r)
                runs.append(result)
                print(json.dumps(result), flush=True)
    summary: dict[str, Any] = {}
    for mode in modes:
        mine = [x for x in runs if x["mode"] == mode]
        summary[mode] = {
            "jobs_per_s_median": statistics.median(x["jobs_per_s"] for x in mine),
            "daemon_cpu_us_per_job_median": statistics.median(
                x["daemon_cpu_us_per_job"] for x in mine),
            "daemon_cpu_us_per_job_range": [min(x["daemon_cpu_us_per_job"] for x in mine),
                                            max(x["daemon_cpu_us_per_job"] for x in mine)],
            "pg_cpu_us_per_job_median": statistics.median(x["pg_cpu_us_per_job"] for x in mine),
            "spans_missing_total": sum(x["spans_missing"] for x in mine),
        }
    if "off" in summary:
        base = summary["off"]["daemon_cpu_us_per_job_median"]
        for s in summary.values():
            s["cpu_us_per_job_over_off"] = s["daemon_cpu_us_per_job_median"] - base
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "bench" / "results" / f"tracing-cost-{stamp}.json"
    out.write_text(json.dumps({"command": f"python -m bench.tracing_cost --jobs {args.jobs} "
                                          f"--reps {args.reps}",
                               "at": stamp, "runs": runs, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
