"""The provisioned Grafana dashboard only names metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from clients.metrics import CentreMetrics, Peak
from server.metrics import ServerMetrics

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "bridgepool.json"
# PromQL words that look like names but are not metrics.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile",
            "stddev", "stdvar", "count_values", "group"}


def exported_names() -> set[str]:
    """Every sample name the code's registries expose, after one recorded round."""
    registry = CollectorRegistry()
    centre = CentreMetrics("c", registry)
    centre.start_run("r")
    centre.record_exchange("r", 0.0, 1.0, 1, 1)
    centre.record_eval("r", {"eval-loss": 1.0, "eval-tokens": 1.0})
    centre.record_train("r", {"tokens": 1.0, "tokens-per-second": 1.0, "train-loss": 1.0}, [0.1], Peak(1.0, "x"))
    ServerMetrics("r", registry).observe_round({
        "round": 1, "wall-seconds": 1.0, "aggregation-seconds": 0.1, "replied": 1, "failed": {},
        "bytes-sent": 1, "bytes-received": 1, "tokens": 1.0, "centres": {"c": {"compute-seconds": 0.5}}})
    return {s.name for family in registry.collect() for s in family.samples}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values() query)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)  # Grafana: keep the metric
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1) not in KEYWORDS:  # a name followed by "(" is a function
            names.add(m.group(1))
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, query) for every panel target and template variable."""
    board = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["definition"]) for v in board["templating"]["list"]]
    return out


def test_extractor_finds_metric_names_and_skips_the_rest():
    expr = ('histogram_quantile(0.9, sum by (le, centre) (rate(bridgepool_x_bucket{run=~"$run", a="b c"}'
            '[$__rate_interval]))) / on(run) group_left bridgepool_y + 2 * bridgepool_z offset 5m')
    assert metric_names(expr) == {"bridgepool_x_bucket", "bridgepool_y", "bridgepool_z"}
    assert metric_names("label_values(bridgepool_tokens_total, run)") == {"bridgepool_tokens_total"}


def test_every_dashboard_query_names_only_exported_metrics():
    exported = exported_names()
    assert "bridgepool_tokens_total" in exported and "bridgepool_round_duration_seconds_bucket" in exported
    queries = dashboard_queries()
    assert len(queries) >= 10
    for where, query in queries:
        names = metric_names(query)
        assert names, f"{where}: no metric in {query!r}"
        assert names <= exported, f"{where} uses {sorted(names - exported)}, not exported by the code"


@pytest.mark.parametrize("needle", ["tokens", "loss", "utilisation", "bytes", "round duration"])
def test_dashboard_has_the_panels_the_issue_asks_for(needle):
    titles = [p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert any(needle in t for t in titles), titles


def test_provisioning_points_the_dashboard_at_the_provisioned_datasource():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"] if d["type"] == "prometheus"}
    board = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in board["panels"]}
    used |= {t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]}
    assert used and used <= uids
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "bridgepool.yml").read_text())
    compose = yaml.safe_load((GRAFANA / "compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    path = providers["providers"][0]["options"]["path"]
    assert (GRAFANA / mounts[path] / DASHBOARD.name).resolve() == DASHBOARD  # the compose mount serves it
