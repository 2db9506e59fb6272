"""The federation's Prometheus metrics, served by the ServerApp (no Flower).

Flower starts one ServerApp process per run, so this endpoint lives exactly as
long as the run; the centres' own workers serve the per-centre figures. Every
series carries `run` (the run-config `run-name`). Figures are fed from the same
round record that goes into run.json, so the two cannot disagree.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LABELS = ("run",)
# A round is a second (tiny model, GPU) to an hour (large model, slow link).
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
AGG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
LINGER_CAP_SECONDS = 15.0  # Prometheus' default scrape interval


class _ScrapeClock:
    """A collector with no series: the registry collects it on every scrape, so it knows when
    (and how often) someone scrapes this endpoint."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        self.times = [*self.times[-2:], time.monotonic()]
        return []


class ServerMetrics:
    """Record every round; serve optionally (port 0 = recorded but not served)."""

    def __init__(self, run: str, registry: CollectorRegistry | None = None):
        self.run = run
        self.registry = registry or CollectorRegistry()
        self.scrapes = _ScrapeClock()
        self.registry.register(self.scrapes)
        self.changed = time.monotonic()  # when a figure last changed
        r = self.registry
        self.round_seconds = Histogram("bridgepool_round_duration_seconds", "Wall seconds per round",
                                       LABELS, buckets=ROUND_BUCKETS, registry=r)
        self.aggregation_seconds = Histogram("bridgepool_aggregation_seconds", "Seconds aggregating a round",
                                             LABELS, buckets=AGG_BUCKETS, registry=r)
        self.tokens = Counter("bridgepool_federation_tokens", "Training tokens of accepted updates",
                              LABELS, registry=r)
        self.tokens_per_second = Gauge("bridgepool_federation_tokens_per_second",
                                       "Accepted training tokens / wall seconds of the last round", LABELS, registry=r)
        self.replied = Gauge("bridgepool_round_centres_replied", "Centres whose update the last round accepted",
                             LABELS, registry=r)
        self.failed = Gauge("bridgepool_round_centres_failed", "Centres that failed or were rejected last round",
                            LABELS, registry=r)
        self.round_bytes = Gauge("bridgepool_round_bytes", "Model bytes exchanged in the last round",
                                 (*LABELS, "direction"), registry=r)
        self.bytes = Counter("bridgepool_server_bytes", "Model bytes exchanged with centres",
                             (*LABELS, "direction"), registry=r)
        self.utilisation = Gauge("bridgepool_utilisation",
                                 "Mean over accepted centres of compute seconds / round wall seconds (0..1)",
                                 LABELS, registry=r)
        # Unequal centres (round-seconds): per centre, its inner steps and its idle seconds in the last round.
        self.centre_steps = Gauge("bridgepool_centre_round_inner_steps", "Inner steps a centre took in the last round",
                                  (*LABELS, "centre"), registry=r)
        self.centre_idle = Gauge("bridgepool_centre_round_idle_seconds",
                                 "Seconds of the last round a centre neither trained nor evaluated (waited)",
                                 (*LABELS, "centre"), registry=r)
        self.steps_spread = Gauge("bridgepool_round_inner_steps_spread",
                                  "Most / fewest inner steps among the last round's centres (1 = equal)",
                                  LABELS, registry=r)
        self.rounds = Counter("bridgepool_server_rounds", "Rounds aggregated", LABELS, registry=r)
        self.round = Gauge("bridgepool_round", "Last aggregated round", LABELS, registry=r)
        self.rejected = Counter("bridgepool_rejected_updates",
                                "Centre updates left out of a round, by centre and reason (no-reply, "
                                "centre-error, node-unavailable, keys, dtype, shape, non-finite, too-large, "
                                "metrics, norm-outlier)", (*LABELS, "centre", "reason"), registry=r)
        # The run's series exist (at 0) from the start, not from round 1's end: rate() needs a
        # sample before an increase to see it, and a short run's endpoint lives only seconds.
        for metric in (self.round_seconds, self.aggregation_seconds, self.tokens, self.rounds):
            metric.labels(run)
        for direction in ("sent", "received"):
            self.bytes.labels(run, direction)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if not port:
            return
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise RuntimeError(
                f"metrics port {port} of the server (run {self.run}) on {host} cannot be bound "
                f"({err.strerror or err}); free it or set another run-config 'metrics-port'"
            ) from err

    def linger(self, cap: float = LINGER_CAP_SECONDS) -> float:
        """Before the run (this process, and so the endpoint) ends: wait until a scraper that has
        been scraping has seen the final figures, else the last round(s) would never reach
        Prometheus. At most two of its scrape intervals (and `cap`); not at all when nothing has
        scraped twice (no Prometheus, or the interval is unknown). Returns the seconds waited."""
        t0, times = time.monotonic(), self.scrapes.times
        if len(times) < 2:
            return 0.0
        deadline = t0 + min(cap, 2 * (times[-1] - times[-2]) + 0.5)
        while self.scrapes.times[-1] <= self.changed and time.monotonic() < deadline:
            time.sleep(0.05)
        return time.monotonic() - t0

    def reject(self, centre: str, reason: str) -> None:
        """One update that did not count: a failed or silent centre, or one refused by validation."""
        self.rejected.labels(self.run, centre, reason).inc()
        self.changed = time.monotonic()

    def observe_round(self, record: Mapping[str, Any]) -> None:
        """One round record as written to run.json (server/app.py `_round_record`)."""
        run, wall = self.run, float(record["wall-seconds"])
        accepted = {name: m for name, m in record["centres"].items() if name not in record["failed"]}
        self.round_seconds.labels(run).observe(wall)
        self.aggregation_seconds.labels(run).observe(float(record["aggregation-seconds"]))
        self.tokens.labels(run).inc(float(record["tokens"]))
        self.tokens_per_second.labels(run).set(float(record["tokens"]) / wall if wall > 0 else 0.0)
        self.replied.labels(run).set(int(record["replied"]))
        self.failed.labels(run).set(len(record["failed"]))
        for direction in ("sent", "received"):
            self.round_bytes.labels(run, direction).set(float(record[f"bytes-{direction}"]))
            self.bytes.labels(run, direction).inc(float(record[f"bytes-{direction}"]))
        compute = [float(m.get("compute-seconds", 0.0)) for m in accepted.values()]
        self.utilisation.labels(run).set(sum(compute) / len(compute) / wall if compute and wall > 0 else 0.0)
        for centre, steps in record.get("inner-steps", {}).items():
            self.centre_steps.labels(run, centre).set(float(steps))
        for centre, idle in record.get("idle-seconds", {}).items():
            self.centre_idle.labels(run, centre).set(float(idle))
        if record.get("inner-steps-spread") is not None:
            self.steps_spread.labels(run).set(float(record["inner-steps-spread"]))
        self.rounds.labels(run).inc()
        self.round.labels(run).set(int(record["round"]))
        self.changed = time.monotonic()


def centre_balance(wall: float, metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """How unequal the round's centres were: each one's inner steps, its idle seconds (the round's
    wall less its own evaluation and training: time it waited for the others and for the
    transfers) and the spread of the steps (most / fewest; 1 = equal)."""
    steps = {c: m.get("inner-steps", 0.0) for c, m in metrics.items()}
    idle = {c: max(0.0, wall - m.get("compute-seconds", 0.0) - m.get("eval-seconds", 0.0))
            for c, m in metrics.items()}
    counts = [s for s in steps.values() if s > 0]
    return {"inner-steps": steps, "idle-seconds": idle,
            # None (JSON null, not NaN, which strict JSON readers refuse) when no centre reported its steps
            "inner-steps-spread": max(counts) / min(counts) if counts else None}
