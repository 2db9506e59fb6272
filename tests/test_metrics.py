"""Metric code: peak FLOPs, what a centre and the server record, ports, the scrape config."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml

from clients.metrics import (
    CentreMetrics,
    MetricsPortInUse,
    Peak,
    cpu_peak,
    device_peak,
    gpu_peak,
    mfu,
)
from deploy.local import LocalFederation
from deploy.processes import LaunchError
from deploy.prometheus import scrape_config
from models.config import load_defaults
from server.metrics import ServerMetrics
from tests.conftest import free_base_port, make_centres

AVX2 = "processor\t: 0\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512 = "processor\t: 0\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu avx2 fma avx512f\n"


def held_port() -> socket.socket:
    """A listening socket on a free loopback port (the caller closes it)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# ------------------------------------------------------------------ peaks, MFU
def test_cpu_peak_is_an_estimate_from_clock_and_simd_width():
    assert cpu_peak(1, AVX2) == Peak(2.0e9 * 8 * 2 * 2, "estimate:cpu")
    assert cpu_peak(4, AVX512).flops == 4 * 3.0e9 * 16 * 2 * 2
    assert cpu_peak(2, "flags : fpu sse2\n").flops == 2 * 2.5e9 * 4 * 2 * 2  # no clock: the fallback


def test_gpu_peak_from_the_table_specific_names_first():
    assert gpu_peak("NVIDIA H100 PCIe", True) == Peak(756e12, "datasheet:H100 PCIe")
    assert gpu_peak("NVIDIA H100 80GB HBM3", True) == Peak(989e12, "datasheet:H100")
    assert gpu_peak("NVIDIA A10G", False) == Peak(31.2e12, "datasheet:A10G")
    assert gpu_peak("NVIDIA A100-SXM4-80GB", False).flops == 19.5e12  # fp32 column
    assert gpu_peak("Some Future GPU", True) is None


def test_unknown_gpu_falls_back_to_a_labelled_estimate():
    assert device_peak("cuda", "Some Future GPU", True, 4).source == "estimate:cpu"
    assert device_peak("cuda", "NVIDIA H200", True, 4).source == "datasheet:H200"
    assert device_peak("cpu", "", False, 4).source == "estimate:cpu"


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(1000.0, 6e6, Peak(12e9, "x")) == pytest.approx(0.5)
    assert mfu(1000.0, 6e6, Peak(0.0, "unknown")) == 0.0


# ------------------------------------------------------------------ a centre
def sample(m: CentreMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"centre": m.centre, "run": "r1", **labels})


def test_centre_counts_compute_waiting_and_bytes_per_run():
    m = CentreMetrics("fr-genci")
    m.start_run("r1")
    assert sample(m, "bridgepool_tokens_total") == 0.0  # exists before the first round ends
    assert sample(m, "bridgepool_inner_step_seconds_count") == 0.0  # so does the step histogram (its p90 panel)
    m.record_exchange("r1", arrived=10.0, replied=14.0, received=100, sent=40)
    m.record_exchange("r1", arrived=20.0, replied=23.0, received=100, sent=40)
    assert sample(m, "bridgepool_compute_seconds_total") == 7.0
    assert sample(m, "bridgepool_wait_seconds_total") == 6.0  # 14 -> 20; nothing before the first request
    assert sample(m, "bridgepool_bytes_received_total") == 200
    assert sample(m, "bridgepool_bytes_sent_total") == 80
    m.record_exchange("r2", arrived=100.0, replied=101.0, received=1, sent=1)  # a new run waits for nothing
    assert m.registry.get_sample_value("bridgepool_wait_seconds_total", {"centre": "fr-genci", "run": "r2"}) == 0.0


def test_centre_records_a_training_round():
    m = CentreMetrics("de-lrz")
    peak = Peak(1e9, "estimate:cpu")
    figures = {"tokens": 3840.0, "tokens-per-second": 1000.0, "train-loss": 4.5, "flops-per-token": 2e5,
               "peak-memory-bytes": 1e8}
    for _ in range(2):
        m.record_train("r1", figures, [0.01, 0.02, 0.3], peak)
    m.record_eval("r1", {"eval-loss": 5.0, "eval-tokens": 256.0})
    assert sample(m, "bridgepool_tokens_total") == 7680.0
    assert sample(m, "bridgepool_rounds_completed_total") == 2
    assert sample(m, "bridgepool_tokens_per_second") == 1000.0
    assert sample(m, "bridgepool_train_loss") == 4.5 and sample(m, "bridgepool_eval_loss") == 5.0
    assert sample(m, "bridgepool_inner_step_seconds_count") == 6
    assert sample(m, "bridgepool_inner_step_seconds_bucket", le="0.025") == 4
    assert sample(m, "bridgepool_mfu", peak_source="estimate:cpu") == pytest.approx(0.2)
    assert sample(m, "bridgepool_peak_memory_bytes") == 1e8


def test_centre_endpoint_serves_and_a_taken_port_names_port_and_centre():
    m = CentreMetrics("es-bsc")
    m.start_run("r1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'bridgepool_tokens_total{centre="es-bsc",run="r1"} 0.0' in body
    with pytest.raises(MetricsPortInUse, match=f"metrics port {port} of centre other"):
        CentreMetrics("other").serve(port)


def test_worker_with_a_taken_metrics_port_fails_at_start(tmp_path, corpora):
    with held_port() as s:
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "centre", "serve", "--centre", "fr-genci",
             "--data-dir", str(corpora["fr-genci"]), "--state-dir", str(tmp_path), "--socket",
             str(tmp_path / "w.sock"), "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"metrics port {port} of centre fr-genci" in proc.stderr
    assert not (tmp_path / "w.sock").exists()  # it never started serving


def test_worker_records_what_its_trainer_measured(tmp_path, corpora):
    from clients.worker import CentreWorker
    from models.gpt import build_model
    from models.packing import PARAMS_KEY, pack

    worker = CentreWorker("fr-genci", corpora["fr-genci"], tmp_path)
    run_config = {**load_defaults(), "model": "tiny", "inner-steps": 3, "batch-size": 2, "eval-batches": 1,
                  "threads": 1, "device": "cpu", "run-name": "r1"}
    arrays = {PARAMS_KEY: pack(build_model("tiny", seed=0).state_dict())}
    reply, _ = worker.handle({"op": "train", "round": 1, "run-config": run_config}, arrays)
    m, figures = worker.metrics, reply["metrics"]
    assert sample(m, "bridgepool_tokens_total") == figures["tokens"] == 3 * 2 * 32
    assert sample(m, "bridgepool_inner_step_seconds_count") == 3
    assert sample(m, "bridgepool_inner_step_seconds_sum") <= figures["compute-seconds"]
    assert sample(m, "bridgepool_eval_loss") == figures["eval-loss"]
    assert 0 < sample(m, "bridgepool_mfu", peak_source="estimate:cpu") < 1


# ------------------------------------------------------------------ the server
def round_record(**over) -> dict:
    return {"round": 3, "wall-seconds": 10.0, "aggregation-seconds": 0.2, "replied": 2,
            "failed": {"es-bsc": "rejected: NaN"}, "bytes-sent": 3000, "bytes-received": 2000, "tokens": 8000.0,
            "centres": {"fr-genci": {"compute-seconds": 6.0}, "de-lrz": {"compute-seconds": 8.0},
                        "es-bsc": {"compute-seconds": 1.0}}, **over}


def test_server_records_a_round_from_its_run_json_record():
    m = ServerMetrics("r1")
    m.observe_round(round_record())
    m.observe_round(round_record(round=4))

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, {"run": "r1", **labels})

    assert value("bridgepool_federation_tokens_total") == 16000.0
    assert value("bridgepool_federation_tokens_per_second") == 800.0
    assert value("bridgepool_utilisation") == pytest.approx(0.7)  # rejected es-bsc left out
    assert value("bridgepool_round_centres_replied") == 2 and value("bridgepool_round_centres_failed") == 1
    assert value("bridgepool_round_bytes", direction="sent") == 3000
    assert value("bridgepool_server_bytes_total", direction="received") == 4000
    assert value("bridgepool_round_duration_seconds_count") == 2
    assert value("bridgepool_round_duration_seconds_bucket", le="5.0") == 0
    assert value("bridgepool_aggregation_seconds_sum") == pytest.approx(0.4)
    assert value("bridgepool_round") == 4 and value("bridgepool_server_rounds_total") == 2


def test_server_lingers_until_a_scraper_has_seen_the_last_round():
    """The endpoint dies with the run's process: a scraper that has been scraping gets the final
    figures before it goes; with nobody scraping, the run does not wait at all."""
    alone = ServerMetrics("r0")
    alone.observe_round(round_record())
    assert alone.linger() == 0.0

    m = ServerMetrics("r1")
    port = free_base_port(1)
    m.serve(port)
    seen: list[str] = []
    stop = threading.Event()

    def scrape() -> None:  # Prometheus at a 0.3 s interval
        while not stop.is_set():
            seen.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
            stop.wait(0.3)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        while len(seen) < 2:
            time.sleep(0.05)
        m.observe_round(round_record(round=7))
        waited = m.linger()
    finally:
        stop.set()  # no scrape starts after this: one that has the last round happened before
        scraper.join(5)
    assert any('bridgepool_round{run="r1"} 7.0' in text for text in seen), seen[-1][-500:]
    assert waited < 2 * 0.3 + 0.5 + 0.5


def test_server_port_in_use_names_the_port():
    with held_port() as s:
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"metrics port {port} of the server"):
            ServerMetrics("r1").serve(port)


# ------------------------------------------------------------------ launcher
def test_launcher_refuses_a_taken_centre_metrics_port_before_starting(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 2)
    base = free_base_port(7)
    fed = LocalFederation(run_dir, centres, base_port=base, metrics_port=base + 3)
    assert fed.centre_metrics_ports() == {"fr-genci": base + 4, "de-lrz": base + 5}
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 5))
        s.listen()
        with pytest.raises(LaunchError, match=f"port {base + 5} \\(metrics endpoint of centre de-lrz\\)"):
            with fed:
                pass
    assert not fed.group.procs


def test_scrape_config_is_valid_for_prometheus(tmp_path):
    text = scrape_config(9300, {"fr-genci": 9301, "de-lrz": 9302})
    config = yaml.safe_load(text)
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["127.0.0.1:9300", "127.0.0.1:9301", "127.0.0.1:9302"]
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_port_is_a_run_config_key():
    from models.config import ConfigError, RunConfig

    assert RunConfig.from_mapping(load_defaults()).metrics_port == 0
    with pytest.raises(ConfigError, match="'metrics-port' must be >= 0"):
        RunConfig.from_mapping({**load_defaults(), "metrics-port": -1})
