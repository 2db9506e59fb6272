"""The server's real round loop (`server.app.federate`) on a scripted grid (issue 19, "tests that could
not fail"): central DP's noise in the global step, and rejections counted by the loop itself.

The grid stands in for the SuperLink: every node answers the loop's own messages (prepare, train,
the final evaluate) at once with scripted content, so what is checked is `federate` as the
ServerApp runs it (screening, aggregation, DP, checkpoint, run.json, metrics), not a copy of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from models.config import RunConfig, load_defaults
from models.gpt import build_model
from models.packing import PARAMS_KEY, pack
from server.app import federate
from server.metrics import ServerMetrics
from server.runlog import RunLog
from server.validation import token_cap
from tests.test_redteam_server import Grid as ScriptedGrid
from tests.test_redteam_server import serverapp_identity  # noqa: F401  (autouse here too)

NAMES = {1: "fr-genci", 2: "de-lrz", 3: "es-bsc", 4: "hostile"}


class Grid(ScriptedGrid):
    """Nodes that answer every message at once: train with `weights[node]`, the rest with metrics
    (push_messages and the ServerApp identity fixture: tests/test_redteam_server.py's)."""

    def __init__(self, weights: dict[int, np.ndarray], tokens: float):
        super().__init__({})
        self.weights, self.tokens = weights, tokens

    def get_node_ids(self) -> list[int]:
        return list(self.weights)

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [answer(msg, NAMES[msg.metadata.dst_node_id], self.tokens, self.weights[msg.metadata.dst_node_id])
                for msg in pending(self, ids)]


def pending(grid: ScriptedGrid, ids: list[str]) -> list[Message]:
    """The messages pushed to the scripted `grid` among `ids` not answered yet (each answered once)."""
    return [m for m in (grid.sent.pop(mid, None) for mid in ids) if m is not None]


def answer(msg: Message, name: str, tokens: float, weights: np.ndarray) -> Message:
    """A centre's reply to `msg`: the round's metrics under the `name` it claims and, to a train
    message, `weights` as its new model."""
    content = RecordDict({"metrics": MetricRecord({"tokens": tokens, "train-loss": 3.0, "eval-loss": 3.1}),
                          "centre": ConfigRecord({"name": name})})
    if msg.metadata.message_type == "train":
        content["arrays"] = ArrayRecord({PARAMS_KEY: Array(weights)})
    return Message(content=content, reply_to=msg)


def _config(run_dir: Path, **over) -> RunConfig:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": 1, "inner-steps": 2,
                                   "batch-size": 2, "expected-centres": 3, "min-centres": 3,
                                   "data-plane": "flower", "compression": "none", "strategy": "diloco",
                                   "outer-lr": 1.0, "outer-momentum": 0.0, "connect-timeout": 10.0,
                                   "round-timeout": 10.0, "run-dir": str(run_dir), "run-name": run_dir.name,
                                   **over})


def _run(run_dir: Path, cfg: RunConfig, weights: dict[int, np.ndarray]) -> tuple[np.ndarray, dict, ServerMetrics]:
    run_dir.mkdir(parents=True)
    runlog, metrics = RunLog(run_dir, cfg.to_mapping()), ServerMetrics(cfg.run_name)
    federate(Grid(weights, token_cap(cfg)), cfg, run_dir, runlog, metrics)
    final = pack({k: v for k, v in load_file(run_dir / "final_model.safetensors").items()})
    return final, runlog.data, metrics


def _initial() -> np.ndarray:
    return pack({k: v.float() for k, v in build_model("tiny", seed=load_defaults()["seed"]).state_dict().items()})


def test_central_dp_noise_in_the_global_step_has_std_z_c_over_n(tmp_path):
    """Three centres send the same update, far longer than the clip C: every pseudo-gradient is clipped
    to C, the clipped mean is the same with or without noise, and (outer-lr 1, no momentum) the global
    step's difference between the two runs is exactly the noise: std z x C / n per coordinate."""
    start = _initial()
    delta = (np.random.default_rng(0).standard_normal(start.size) * 0.05).astype(np.float32)
    weights = {node: start - delta for node in (1, 2, 3)}
    clip, z, n = 0.5, 2.0, 3
    plain, _, _ = _run(tmp_path / "plain", _config(tmp_path / "plain", **{"dp-clip": clip}), weights)
    noisy, run, _ = _run(tmp_path / "noisy", _config(tmp_path / "noisy", **{"dp-clip": clip,
                                                                            "dp-noise-multiplier": z}), weights)
    clipped = delta * (clip / np.linalg.norm(delta))
    np.testing.assert_allclose(start - plain, clipped, atol=1e-5)  # the clipped mean, and nothing else
    noise = noisy - plain
    assert noise.size > 10_000
    assert abs(noise.mean()) < 4 * (z * clip / n) / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(z * clip / n, rel=0.03)
    dp = run["rounds"][0]["dp"]
    assert (dp["noise-multiplier"], dp["clip"], dp["noise-std"]) == (z, clip, pytest.approx(z * clip / n))
    assert dp["epsilon"] is not None


def test_federate_counts_the_rejections_it_makes(tmp_path):
    """A fourth centre sends non-finite weights: the loop rejects it with the reason code, records it in
    run.json and in Prometheus, and aggregates the three others alone."""
    start = _initial()
    rng = np.random.default_rng(1)
    honest = {node: (start - rng.standard_normal(start.size) * 1e-3).astype(np.float32) for node in (1, 2, 3)}
    poisoned = honest[1].copy()
    poisoned[::50] = np.nan
    cfg = _config(tmp_path / "run", **{"expected-centres": 4, "min-centres": 3})
    final, run, metrics = _run(tmp_path / "run", cfg, {**honest, 4: poisoned})
    record = run["rounds"][0]
    assert record["replied"] == 3 and record["tokens"] == 3 * token_cap(cfg)  # the hostile one's not counted
    assert record["inner-steps-spread"] is None  # these centres report no steps: null in run.json, not NaN
    assert list(record["failed"]) == ["hostile"] and record["failed"]["hostile"].startswith("rejected (non-finite)")
    counted = metrics.registry.get_sample_value("bridgepool_rejected_updates_total",
                                                {"run": cfg.run_name, "centre": "hostile", "reason": "non-finite"})
    assert counted == 1
    expected = np.mean([honest[n] for n in (1, 2, 3)], axis=0)  # equal tokens: the plain mean of the three
    np.testing.assert_allclose(final, expected, atol=1e-6)
    assert torch.isfinite(torch.from_numpy(final)).all()
