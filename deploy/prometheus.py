"""Prometheus for a local federation: the scrape config, and a real server to query.

LocalFederation writes RUN_DIR/prometheus.yml (`scrape_config`); `Prometheus`
runs the Debian `prometheus` binary on it with its own storage directory, for
`bridgepool demo --prometheus-port` and the tests, and queries its HTTP API.

    prometheus --config.file RUN_DIR/prometheus.yml --storage.tsdb.path RUN_DIR/prometheus
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from deploy.processes import check_port_free

SCRAPE_INTERVAL = "1s"  # loopback and a few dozen series: cheap, and short rounds still show


def scrape_config(server_port: int, centre_ports: dict[str, int], interval: str = SCRAPE_INTERVAL) -> str:
    """prometheus.yml scraping the ServerApp and every centre worker on 127.0.0.1."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": "bridgepool-server",
             "static_configs": [{"targets": [f"127.0.0.1:{server_port}"]}]},
            {"job_name": "bridgepool-centres",
             "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"centre_endpoint": name}}
                                for name, port in centre_ports.items()]},
        ],
    }
    return "# Written by bridgepool (deploy/local.py); see deploy/prometheus.py\n" + yaml.safe_dump(
        config, sort_keys=False)


class PrometheusError(RuntimeError):
    """Prometheus could not be started or answered with an error."""


class Prometheus:
    """A Prometheus server process on 127.0.0.1:port; stopped on exit."""

    def __init__(self, config: Path, storage: Path, port: int, log: Path, binary: str = "prometheus"):
        self.config, self.storage, self.port, self.log = Path(config), Path(storage), port, Path(log)
        found = shutil.which(binary) or (binary if Path(binary).exists() else None)
        if found is None:
            raise PrometheusError(f"`{binary}` not found; install it with deploy/install-system-packages.sh "
                                  "(Debian package prometheus)")
        self.binary = found
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        check_port_free(self.port, "Prometheus", flag="--prometheus-port")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.storage}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with code {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus on port {self.port} not ready within {timeout:.0f}s; "
                                      f"see {self.log}")
            time.sleep(0.3)

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns `data`, or raises with Prometheus' own error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise PrometheusError(f"{url}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant vector: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        return self.api("query", query=expr, **({"time": at} if at is not None else {}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets_up(self) -> dict[str, str]:
        """scrape URL -> health ("up", "down", "unknown") of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}
