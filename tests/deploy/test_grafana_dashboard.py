"""deploy/grafana/jobd.json, validated offline and against a real Prometheus.

No Grafana server is installable here, so: the JSON model's basics (fixed uid, no id,
no `__inputs`, unique panel ids, rows recursed into), every datasource is the
`${datasource}` variable, every `$variable` used is defined (or a Grafana built-in),
every expression parses with promql_parser once the variables are substituted, names
only metrics jobd exports and shows all of them, groups histogram_quantile by `le`, and
is accepted by a real Prometheus's /api/v1/query. The provisioning files point where the
README installs the dashboard.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.test_prometheus_rules import (
    JOBD_METRICS,
    OTHER_METRICS,
    PrometheusServer,
    base_metric,
    metric_names,
)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "jobd.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Grafana's global variables, with a value each that makes the expression valid PromQL.
BUILTINS = {
    "__rate_interval": "5m", "__interval": "1m", "__range": "6h", "__interval_ms": "60000",
    "__range_s": "21600", "__range_ms": "21600000", "__auto_interval": "1m",
}
# The dashboard's own variables, as Grafana renders an "All"/multi selection.
SAMPLE = {"region": "eu-west|us-east", "queue": ".*", "datasource": "prometheus"}
VAR = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def expressions(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for each panel target and each query variable's selector."""
    found = []
    for panel in all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['id']} {panel['title']!r} {target['refId']}",
                          target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert match, f"variable {var['name']}: unexpected query {query!r}"
            found.append((f"variable {var['name']}", match.group(1)))
    return found


def substitute(expr: str, defined: set[str]) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        assert name in defined, f"${name} is not a dashboard variable"
        return SAMPLE[name]

    return VAR.sub(value, expr)


def substituted() -> list[tuple[str, str]]:
    dash = load()
    defined = set(variables(dash))
    return [(where, substitute(expr, defined)) for where, expr in expressions(dash)]


def test_dashboard_model_basics() -> None:
    dash = load()
    assert dash["uid"] == "jobd-overview"
    assert dash.get("id") is None
    assert "__inputs" not in dash and "${DS_" not in DASHBOARD.read_text()
    assert dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in all_panels(dash["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"


def test_every_datasource_is_the_template_variable() -> None:
    dash = load()
    var = variables(dash)["datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    for panel in all_panels(dash["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DS) == DS, (panel["title"], target["refId"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == DS, v["name"]


def test_variables_region_and_queue() -> None:
    vs = variables(load())
    assert {"datasource", "region", "queue"} <= set(vs)
    for name in ("region", "queue"):
        assert vs[name]["multi"] and vs[name]["includeAll"], name
    # Every variable defined is used somewhere.
    text = json.dumps([e for _, e in expressions(load())])
    for name in vs:
        if name != "datasource":
            assert f"${name}" in text, f"variable {name} is never used"


def test_every_expression_parses_and_uses_known_metrics() -> None:
    import promql_parser

    used: set[str] = set()
    allowed = JOBD_METRICS | OTHER_METRICS | {"process_cpu_seconds_total",
                                              "process_resident_memory_bytes",
                                              "process_start_time_seconds"}
    exprs = substituted()
    assert len(exprs) >= 20
    for where, expr in exprs:
        try:
            names = metric_names(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")
        names = {base_metric(n) for n in names}
        assert names <= allowed, f"{where}: unknown metrics {names - allowed}"
        used |= names

        def check_quantile(node, where=where):
            if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
                inner = node.args[1]
                assert isinstance(inner, promql_parser.AggregateExpr), where
                assert "le" in (inner.modifier.labels if inner.modifier else []), where

        promql_parser.walk(promql_parser.parse(expr), check_quantile)
    missing = JOBD_METRICS - used
    assert not missing, f"jobd metrics not on the dashboard: {sorted(missing)}"


def test_queries_select_their_region() -> None:
    """Every jobd selector is filtered by $region (else a panel mixes regions)."""
    for where, expr in expressions(load()):
        if where.startswith("variable region"):
            continue
        for selector in re.findall(r"(?:jobd_|process_|up\b)\w*\{([^}]*)\}", expr):
            assert 'region=~"$region"' in selector, f"{where}: {expr}"
        assert not re.search(r"\b(jobd_\w+|process_\w+)\b(?!\{)", expr.replace("_bucket", "")), \
            f"{where}: a selector without labels: {expr}"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (apt-get install -y --no-install-recommends "
                    "prometheus; .ci/run does it as root)")
    server = PrometheusServer(tmp_path_factory.mktemp("prom-dash"),
                              "global:\n  scrape_interval: 15s\n")
    try:
        yield server
    finally:
        server.stop()


def test_real_prometheus_accepts_every_expression(prometheus: PrometheusServer) -> None:
    errors = []
    for where, expr in substituted():
        try:
            answer = prometheus.api("query", query=expr)
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
        if answer.get("status") != "success":
            errors.append(f"{where}: {answer.get('error')}\n  {expr}")
    assert not errors, "\n".join(errors)


def test_provisioning_files() -> None:
    dashboards = (GRAFANA / "provisioning" / "dashboards" / "jobd.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", dashboards, re.M)
    assert re.search(r"^\s+type: file$", dashboards, re.M)
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards/jobd$", dashboards, re.M)
    datasources = (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", datasources, re.M)
    assert re.search(r"^\s+type: prometheus$", datasources, re.M)
