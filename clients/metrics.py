"""A centre's Prometheus metrics, served by its long-lived worker (no Flower, no torch).

The ClientApp is a fresh process every round, so it cannot hold counters; the
worker lives across rounds and runs, so it owns one registry and serves it on
the centre's own metrics port (`bridgepool centre serve --metrics-port N`).
Every series carries `centre` and `run` (the run-config `run-name`).

MFU = tokens/s x the model's training FLOPs per token / the device's peak FLOPs.
GPU peaks come from the vendors' datasheets (dense, no sparsity); a CPU's peak is
an estimate from cores x clock x SIMD width, and says so in `peak_source`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LABELS = ("centre", "run")
# Inner steps take ~1 ms (small model, GPU) to tens of seconds (large model, CPU).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Dense peak FLOP/s per GPU: (bf16/fp16 tensor cores, plain fp32). First substring of
# torch.cuda.get_device_name() that matches wins, so specific names come first.
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),  # SXM; NVL and HBM3 variants report "H100 80GB HBM3"
    ("GH200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 tensor cores; no bf16
    ("T4", 65e12, 8.1e12),
)
CPU_FALLBACK_HZ = 2.5e9  # when /proc/cpuinfo gives no clock


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of the compute this centre uses
    source: str  # "datasheet:<gpu>" or "estimate:cpu" (the MFU gauge's `peak_source` label)


def gpu_peak(device_name: str, low_precision: bool) -> Peak | None:
    """Datasheet peak of a known GPU, or None when the table does not list it."""
    for needle, bf16, fp32 in GPU_PEAK_FLOPS:
        if needle.lower() in device_name.lower():
            return Peak(bf16 if low_precision else fp32, f"datasheet:{needle}")
    return None


def cpu_peak(threads: int, cpuinfo: str | None = None) -> Peak:
    """fp32 peak of `threads` cores: clock x FMA lanes x 2 FMA units x 2 FLOPs per FMA.

    An upper bound that ignores turbo and memory bandwidth, hence `estimate:cpu`.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    hz = 0.0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz" and not hz:
            hz = float(value) * 1e6
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4  # fp32 per vector
    return Peak(max(1, threads) * (hz or CPU_FALLBACK_HZ) * lanes * 2 * 2, "estimate:cpu")


def device_peak(device_type: str, device_name: str, low_precision: bool, threads: int) -> Peak:
    """The peak to divide by: a listed GPU's datasheet figure, else a CPU-style estimate."""
    if device_type == "cuda":
        known = gpu_peak(device_name, low_precision)
        if known is not None:
            return known
    return cpu_peak(threads)


def mfu(tokens_per_second: float, flops_per_token: float, peak: Peak) -> float:
    return tokens_per_second * flops_per_token / peak.flops if peak.flops > 0 else 0.0


class MetricsPortInUse(RuntimeError):
    """A metrics port could not be bound; the message names the port and its owner."""


def serve_registry(registry: CollectorRegistry, port: int, host: str, owner: str) -> None:
    """Serve `registry` over HTTP on host:port in a daemon thread, or raise naming `owner`."""
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise MetricsPortInUse(
            f"metrics port {port} of {owner} on {host} cannot be bound ({err.strerror or err}); "
            f"stop what holds it (`ss -ltnp 'sport = :{port}'`) or pass another --metrics-port"
        ) from err


class CentreMetrics:
    """The figures of one centre, per run; record first, serve optionally (port 0 = not served)."""

    def __init__(self, centre: str, registry: CollectorRegistry | None = None):
        self.centre = centre
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tokens = Counter("bridgepool_tokens", "Training tokens processed by the centre", LABELS, registry=r)
        self.eval_tokens = Counter("bridgepool_eval_tokens", "Held-out tokens evaluated", LABELS, registry=r)
        self.tokens_per_second = Gauge("bridgepool_tokens_per_second",
                                       "Training tokens/s over the centre's last round", LABELS, registry=r)
        self.step_seconds = Histogram("bridgepool_inner_step_seconds", "Seconds per inner optimiser step",
                                      LABELS, buckets=STEP_BUCKETS, registry=r)
        self.compute_seconds = Counter("bridgepool_compute_seconds",
                                       "Seconds the worker spent answering requests", LABELS, registry=r)
        self.wait_seconds = Counter("bridgepool_wait_seconds",
                                    "Seconds from a reply to the next request (waiting for the server)",
                                    LABELS, registry=r)
        self.bytes_sent = Counter("bridgepool_bytes_sent", "Bytes the worker sent back towards the server",
                                  LABELS, registry=r)
        self.bytes_received = Counter("bridgepool_bytes_received", "Bytes the worker received from the server",
                                      LABELS, registry=r)
        self.train_loss = Gauge("bridgepool_train_loss", "Mean training loss of the last round", LABELS, registry=r)
        self.eval_loss = Gauge("bridgepool_eval_loss", "Held-out loss of the last model received",
                               LABELS, registry=r)
        self.mfu = Gauge("bridgepool_mfu", "Model FLOPs utilisation of the last round (0..1)",
                         (*LABELS, "peak_source"), registry=r)
        self.peak_flops = Gauge("bridgepool_peak_flops", "Peak FLOP/s the MFU divides by",
                                (*LABELS, "peak_source"), registry=r)
        self.peak_memory = Gauge("bridgepool_peak_memory_bytes",
                                 "Peak memory of the last round (GPU allocated, or CPU max RSS)", LABELS, registry=r)
        # A multi-rank centre (clients/ranks.py): the figures above are the centre's totals; these say
        # which rank is the slow or the full one.
        self.rank_step_seconds = Gauge("bridgepool_rank_step_seconds_mean",
                                       "Mean inner-step seconds of each rank over the last round",
                                       (*LABELS, "rank"), registry=r)
        self.rank_peak_memory = Gauge("bridgepool_rank_peak_memory_bytes",
                                      "Peak memory of each rank over the last round", (*LABELS, "rank"), registry=r)
        self.inner_steps = Gauge("bridgepool_round_inner_steps",
                                 "Inner steps of the centre's last round (a time budget sets them: round-seconds)",
                                 LABELS, registry=r)
        self.rounds = Counter("bridgepool_rounds_completed", "Training rounds the centre completed",
                              LABELS, registry=r)
        self.egress_blocked = Counter("bridgepool_egress_blocked",
                                      "Replies the egress guard stopped from leaving the centre (clients/egress.py)",
                                      LABELS, registry=r)
        self._last_reply: tuple[str, float] | None = None  # (run, time) of the last reply sent

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if port:
            serve_registry(self.registry, port, host, f"centre {self.centre}")

    def start_run(self, run: str) -> None:
        """Create the run's series at zero, so that rate() sees the first round's increase."""
        for metric in (self.tokens, self.eval_tokens, self.compute_seconds, self.wait_seconds,
                       self.bytes_sent, self.bytes_received, self.rounds, self.egress_blocked, self.step_seconds):
            metric.labels(self.centre, run)

    def record_exchange(self, run: str, arrived: float, replied: float, received: int, sent: int) -> None:
        """One request: arrival and reply times (one monotonic clock) and bytes moved (the worker
        socket plus the data plane)."""
        c = (self.centre, run)
        waited = arrived - self._last_reply[1] if self._last_reply and self._last_reply[0] == run else 0.0
        self.wait_seconds.labels(*c).inc(max(0.0, waited))  # a run's first request waited for nothing
        self.compute_seconds.labels(*c).inc(max(0.0, replied - arrived))
        self.bytes_received.labels(*c).inc(received)
        self.bytes_sent.labels(*c).inc(sent)
        self._last_reply = (run, replied)

    def record_egress_blocked(self, run: str) -> None:
        self.egress_blocked.labels(self.centre, run).inc()

    def record_eval(self, run: str, figures: Mapping[str, float]) -> None:
        c = (self.centre, run)
        self.eval_loss.labels(*c).set(figures["eval-loss"])
        self.eval_tokens.labels(*c).inc(figures.get("eval-tokens", 0.0))

    def record_train(self, run: str, figures: Mapping[str, float], step_seconds: Iterable[float],
                     peak: Peak, ranks: Sequence[Mapping[str, float]] = ()) -> None:
        """A finished training round's figures (CentreTrainer.train_round's metrics), and each
        rank's (RoundResult.ranks) for a multi-rank centre."""
        c = (self.centre, run)
        for rank, own in enumerate(ranks):
            self.rank_step_seconds.labels(*c, str(rank)).set(own["step-seconds-mean"])
            self.rank_peak_memory.labels(*c, str(rank)).set(own["peak-memory-bytes"])
        self.tokens.labels(*c).inc(figures["tokens"])
        self.tokens_per_second.labels(*c).set(figures["tokens-per-second"])
        self.train_loss.labels(*c).set(figures["train-loss"])
        self.inner_steps.labels(*c).set(figures.get("inner-steps", 0.0))
        self.peak_memory.labels(*c).set(figures.get("peak-memory-bytes", 0.0))
        self.peak_flops.labels(*c, peak.source).set(peak.flops)
        self.mfu.labels(*c, peak.source).set(
            mfu(figures["tokens-per-second"], figures.get("flops-per-token", 0.0), peak))
        hist = self.step_seconds.labels(*c)
        for seconds in step_seconds:
            hist.observe(seconds)
        self.rounds.labels(*c).inc()
