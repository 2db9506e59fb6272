"""A real Prometheus (Debian's binary) scrapes a real 2-centre federation of the tiny model.

What it scraped must match what the run itself reports in run.json and in
`bridgepool report`, and every Grafana dashboard query must run on it.
"""

from __future__ import annotations

import time

from deploy.local import LocalFederation
from deploy.prometheus import Prometheus
from deploy.report import plot_run, summary_rows
from tests.conftest import free_base_port, make_centres
from tests.test_dashboard import dashboard_queries
from tests.test_federation import tiny_config

PROMETHEUS = "/usr/bin/prometheus"  # Debian package `prometheus` (deploy/install-system-packages.sh)


def scalar(prom: Prometheus, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


def wait_until(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def test_prometheus_scrapes_what_the_run_reports(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 2)
    # SuperLink, 2 SuperNodes, the data plane, server + 2 centre metrics endpoints, Prometheus.
    base = free_base_port(8)
    # Rounds of the default 15 steps last ~0.5 s here: 60 make the training span several 1 s scrapes.
    cfg = tiny_config(run_dir, **{"inner-steps": 60})
    with LocalFederation(run_dir, centres, base_port=base, metrics_port=base + 4) as fed, \
            Prometheus(run_dir / "prometheus.yml", tmp_path / "tsdb", base + 7, fed.logs / "prometheus.log",
                       binary=PROMETHEUS) as prom:
        centre_urls = {f"http://127.0.0.1:{p}/metrics" for p in fed.centre_metrics_ports().values()}
        assert wait_until(lambda: all(prom.targets_up().get(u) == "up" for u in centre_urls), 60), \
            prom.targets_up()
        run = fed.wait(fed.submit(cfg.to_mapping()), timeout=600)
        assert run["status"] == "finished", run.get("message")

        # The workers outlive the run, so the last round's figures are still being scraped.
        expected = sum(r["tokens"] for r in run["rounds"])
        wait_until(lambda: scalar(prom, "sum(bridgepool_tokens_total)") == expected, 60)
        scraped = scalar(prom, "sum(bridgepool_tokens_total)")
        print(f"\nscraped sum(bridgepool_tokens_total) = {scraped}; run.json tokens = {expected}")
        assert scraped == expected == 3 * 2 * 60 * 8 * 32

        report = {row["centre"]: row["tokens"] for row in summary_rows(run)}
        for name, tokens in report.items():
            assert scalar(prom, f'bridgepool_tokens_total{{centre="{name}"}}') == tokens
            assert scalar(prom, f'bridgepool_rounds_completed_total{{centre="{name}"}}') == 3
            assert scalar(prom, f'bridgepool_bytes_received_total{{centre="{name}"}}') > 0
        assert {r["metric"]["peak_source"] for r in prom.query("bridgepool_mfu > 0")} == {"estimate:cpu"}

        # The token rate over the training was positive: the rates whose 15 s window overlaps it, i.e. those
        # evaluated from the run's start to 15 s after its last round. (Ending at the last round itself left
        # a short run only one or two scrapes, and one missed scrape on a busy host emptied the series.)
        started, last_round = run["started"], run["rounds"][-1]["time"]
        rates: list[float] = []

        def rate_seen() -> bool:
            series = prom.query_range("sum(rate(bridgepool_tokens_total[15s]))", started, last_round + 15)
            rates[:] = [float(v) for _, v in series[0]["values"]] if series else []
            return bool(rates) and max(rates) > 0

        ups = 'up{job="bridgepool-centres"}'
        assert wait_until(rate_seen, 20) and min(rates) >= 0, (
            rates, [(r["round"], round(r["time"] - started, 2)) for r in run["rounds"]],
            [[v for _, v in s["values"]] for s in prom.query_range(ups, started, last_round + 15)])

        # The ServerApp's endpoint lived as long as the run; what it last served is in Prometheus' history.
        server = scalar(prom, "max_over_time(bridgepool_federation_tokens_total[10m])")
        assert server == expected
        assert scalar(prom, "max_over_time(bridgepool_round_centres_replied[10m])") == 2
        assert 0 < scalar(prom, "max_over_time(bridgepool_utilisation[10m])") <= 1

        # Every Grafana query is valid PromQL and each panel finds data from this run. A rate needs two
        # scrapes of a series; on a busy machine a worker mid-step can miss its 1 s scrapes, so a series
        # that first appears with round 1's figures (the step histogram) may have two only once the
        # workers idle. They outlive the run: its figures keep being scraped until every panel has them.
        found: dict[str, bool] = {}

        def every_panel_found() -> bool:
            for where, query in dashboard_queries():
                if where.startswith("variable") or found.get(where):
                    continue
                expr = query.replace("$__rate_interval", "15s").replace("$run", ".*")
                found[where] = bool(prom.query_range(expr, started, time.time()))  # raises on a PromQL error
            return all(found.values())

        assert wait_until(every_panel_found, 30, interval=2), [w for w, ok in found.items() if not ok]

    assert all(p.stat().st_size > 0 for p in plot_run(run_dir))  # the report's plots of the same run
