"""A real Prometheus on loopback scrapes a real jobd's /metrics while jobs run.

jobd serves /metrics on `control.http`; Prometheus scrapes it every second with the
`region` target label, as deploy/prometheus/prometheus.yml does. A PromQL query through
Prometheus's HTTP API shows jobd_jobs_finished_total rising as the jobs complete, the
daemon ready, and the series carrying region and instance.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.test_prometheus_rules import JOBD_METRICS, PrometheusServer, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus not installed (apt-get install -y --no-install-recommends prometheus; "
    ".ci/run does it as root)",
)

JOBS = 40  # in two batches


def query(server: PrometheusServer, expr: str) -> list[dict]:
    answer = server.api("query", query=expr)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, predicate, timeout: float = 45.0, server: PrometheusServer | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            log = server.log_text()[-3000:] if server else ""
            raise AssertionError(f"timed out waiting for {what}\n{log}")
        time.sleep(0.25)


def test_prometheus_scrapes_jobd_and_sees_jobs_finish(jobd, tmp_path: Path) -> None:
    port = free_port()
    daemon = jobd(region="eu-west", queues={"default": {"concurrency": 10}},
                  control={"http": f"127.0.0.1:{port}"},
                  extra_toml='[metrics]\nleader_interval = "1s"\n')
    target = f"127.0.0.1:{port}"

    # jobd's own endpoint first, so a failure says which side is wrong.
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    assert "jobd_daemon_ready" in body
    # Every metric the alerts and the dashboard use is declared by the real daemon.
    declared = set(re.findall(r"^# TYPE (\w+) ", body, re.M))
    missing = JOBD_METRICS - declared
    assert not missing, f"jobd does not export {sorted(missing)}"

    config = (
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: jobd\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
        "        labels:\n"
        "          region: eu-west\n"
    )
    server = PrometheusServer(tmp_path / "prom", config)
    try:
        wait_for("the jobd target up", lambda: any(
            r["value"][1] == "1" for r in query(server, 'up{job="jobd", region="eu-west"}')),
            server=server)
        ready = wait_for("jobd_daemon_ready in Prometheus",
                         lambda: query(server, 'jobd_daemon_ready{region="eu-west"}'), server=server)
        assert ready[0]["value"][1] == "1"
        assert ready[0]["metric"]["instance"] == target

        completed = ('jobd_jobs_finished_total'
                     '{region="eu-west", queue="default", kind="noop", outcome="completed"}')
        finished = f"sum({completed})"
        before = query(server, finished)
        baseline = float(before[0]["value"][1]) if before else 0.0

        # Two batches: the first may create the series; the second shows it rising
        # between scrapes, which is what rate() and increase() see.
        args = tmp_path / "args.jsonl"
        args.write_text("{}\n" * (JOBS // 2))
        for batch in (1, 2):
            daemon.jobctl("enqueue", "noop", "--args-file", str(args))
            goal = baseline + batch * (JOBS // 2)

            def risen(goal: float = goal) -> float | None:
                result = query(server, finished)
                value = float(result[0]["value"][1]) if result else 0.0
                return value if value >= goal else None

            wait_for(f"{goal:g} completed jobs in Prometheus", risen, server=server)
        series = query(server, 'jobd_jobs_finished_total{outcome="completed", kind="noop"}')
        assert {s["metric"]["region"] for s in series} == {"eu-west"}
        assert {s["metric"]["instance"] for s in series} == {target}
        # The throughput the dashboard draws: the counter rose between two scrapes.
        rose = wait_for("increase() > 0", lambda: [
            r for r in query(server, f"sum by (region) (increase({completed}[1m]))")
            if float(r["value"][1]) > 0], server=server)
        assert rose[0]["metric"] == {"region": "eu-west"}
    finally:
        server.stop()
