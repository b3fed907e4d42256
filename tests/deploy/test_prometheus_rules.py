"""deploy/prometheus, checked with the real promtool and a real Prometheus server.

- `promtool check config prometheus.yml` (it also loads the rule files it names),
  `promtool check rules alerts.yml`, `promtool test rules alerts_test.yml`.
- alerts_test.yml tests every alert both firing and not firing.
- A real Prometheus loads alerts.yml: every rule is healthy after an evaluation, has
  `for`, a severity and summary/description/runbook, and its PromQL names only the
  metrics jobd exports (plus `up`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"

# The metrics the alerts and the dashboard may use, all exported by jobd
# (daemon/metrics/registry.py; test_the_listed_metrics_are_what_jobd_declares checks it);
# histograms without _bucket/_sum/_count.
JOBD_METRICS = {
    "jobd_jobs_enqueued_total", "jobd_jobs_started_total", "jobd_jobs_finished_total",
    "jobd_job_errors_total", "jobd_key_pauses_total",
    "jobd_breaker_openings_total", "jobd_actor_restarts_total",
    "jobd_job_run_seconds", "jobd_job_wait_seconds", "jobd_db_round_trip_seconds",
    "jobd_claim_batch_size",
    "jobd_queue_jobs", "jobd_queue_oldest_available_age_seconds", "jobd_running_jobs",
    "jobd_key_running_jobs", "jobd_key_effective_rate", "jobd_key_breaker_open",
    "jobd_daemon_info", "jobd_daemon_ready", "jobd_mailbox_messages",
    "jobd_webhook_deliveries_total", "jobd_webhook_retries_total",
    "jobd_webhook_request_seconds", "jobd_webhook_pending",
    "jobd_webhook_oldest_pending_age_seconds",
    "jobd_http_requests_total", "jobd_http_request_seconds",
    "jobd_events_received_total", "jobd_events_deduplicated_total",
    "jobd_event_jobs_started_total", "jobd_jobs_skipped_total",
    "jobd_enqueues_collapsed_total", "jobd_batch_size",
}
HISTOGRAMS = {"jobd_job_run_seconds", "jobd_job_wait_seconds", "jobd_db_round_trip_seconds",
              "jobd_claim_batch_size", "jobd_webhook_request_seconds",
              "jobd_http_request_seconds", "jobd_batch_size"}
OTHER_METRICS = {"up"}  # Prometheus' own per-target series

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (apt-get install -y --no-install-recommends prometheus; "
    ".ci/run does it as root)",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus not installed (apt-get install -y --no-install-recommends prometheus; "
    ".ci/run does it as root)",
)


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS | {
                "jobd_http_request_seconds", "jobd_batch_size"}:
            return name.removesuffix(suffix)
    return name


def metric_names(expr: str) -> set[str]:
    import promql_parser

    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_the_listed_metrics_are_what_jobd_declares() -> None:
    """Every name above is declared (# TYPE) by a daemon's registry, without a daemon."""
    from daemon.metrics import Metrics

    body = Metrics(version="0", region="r", daemon_id="d").exposition()[0].decode()
    declared = set(re.findall(r"^# TYPE (\w+) ", body, re.M))
    assert JOBD_METRICS - declared == set()


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout + result.stderr)


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(PROM / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", (PROM / "alerts.yml").read_text(), re.M)


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    text = (PROM / "alerts_test.yml").read_text()
    fires: set[str] = set()
    quiet: set[str] = set()
    for block in re.split(r"^\s*- eval_time:", text, flags=re.M)[1:]:
        name = re.search(r"^\s*alertname: (\w+)", block, re.M)
        assert name, block
        (quiet if re.search(r"^\s*exp_alerts: \[\]", block, re.M) else fires).add(name.group(1))
    names = set(alert_names())
    assert len(names) >= 6
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"
    assert (fires | quiet) - names == set(), "tests for alerts that do not exist"


def test_scrape_config_labels_each_target_group_with_its_region() -> None:
    text = (PROM / "prometheus.yml").read_text()
    assert re.search(r"^rule_files:\s*\n\s*- alerts\.yml", text, re.M)
    groups = re.findall(r"- targets: \[(.*?)\]\s*\n\s*labels:\s*\n\s*region: ([\w-]+)", text)
    assert len(groups) >= 2, groups
    regions = [r for _, r in groups]
    assert len(set(regions)) == len(regions)
    for region in {p.stem for p in (ROOT / "deploy" / "config").glob("*.toml")}:
        assert region in regions, f"deploy/config/{region}.toml has no scrape targets"


# --- a real Prometheus -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


class PrometheusServer:
    """`prometheus` on loopback with a tmp config and TSDB; stopped by its PID."""

    def __init__(self, directory: Path, config: str):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={directory / 'prometheus.yml'}",
                 f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=directory,
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"prometheus not ready:\n{self.log_text()}")
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return http_json(f"{self.url}/api/v1/{path}{query}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def prometheus_with_alerts(tmp_path: Path) -> Iterator[PrometheusServer]:
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    config = ("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
              f"rule_files:\n  - {tmp_path / 'alerts.yml'}\n")
    server = PrometheusServer(tmp_path / "prom", config)
    try:
        yield server
    finally:
        server.stop()


@needs_prometheus
def test_real_prometheus_loads_and_evaluates_every_alert(
    prometheus_with_alerts: PrometheusServer,
) -> None:
    server = prometheus_with_alerts
    deadline = time.monotonic() + 20
    while True:
        groups = server.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("2") and
                         not r["lastEvaluation"].startswith("0001") for r in rules):
            break
        assert time.monotonic() < deadline, f"rules not evaluated: {rules}"
        time.sleep(0.5)
    assert sorted(r["name"] for r in rules) == sorted(alert_names())
    allowed = JOBD_METRICS | OTHER_METRICS
    for rule in rules:
        name = rule["name"]
        assert rule["type"] == "alerting"
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["labels"].get("severity") in {"warning", "critical"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert "region" in rule["annotations"]["summary"] or name == "JobdMetricsAbsent", name
        used = {base_metric(m) for m in metric_names(rule["query"])}
        assert used <= allowed, f"{name} uses unknown metrics {used - allowed}"
        assert used & JOBD_METRICS, f"{name} uses no jobd metric"
