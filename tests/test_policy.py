"""Red team, issue 19 threat 2: the worker as an oracle, against the centre's own policy.

Whoever holds the worker's socket picks the config and the weights. Each attack below is
made through the worker's real request path (`CentreWorker.handle`, as the ClientApp relays
it) and must be refused before any training or evaluation, named in the error and in the
egress ledger; requests inside the policy still work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients.egress import read_ledger
from clients.policy import Policy, PolicyError, PolicyRefused, largest_model_bytes
from clients.worker import CentreWorker
from models.config import RunConfig, load_defaults
from models.gpt import build_model
from models.packing import PARAMS_KEY, pack


def _config(tmp_path: Path, **over) -> dict:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "inner-steps": 2, "batch-size": 2,
                                   "eval-batches": 1, "threads": 1, "device": "cpu", "run-name": "pol",
                                   "run-dir": str(tmp_path), **over}).to_mapping()


def _weights() -> dict:
    return {PARAMS_KEY: pack(build_model("tiny", seed=0).state_dict())}


def _request(worker: CentreWorker, cfg: dict, op: str = "train", rnd: int = 1):
    return worker.handle({"op": op, "round": rnd, "run-config": cfg}, _weights())


def _refusals(worker: CentreWorker) -> list[dict]:
    return [e for e in read_ledger(worker.egress.ledger) if e["verdict"] == "refused"]


def _with(worker: CentreWorker, policy: Policy) -> CentreWorker:
    from clients.policy import Gate

    worker.policy, worker.gate = policy, Gate(policy, worker.egress.refused)
    return worker


def test_the_one_token_oracle_is_refused_by_the_default_policy(worker, tmp_path):
    oracle = _config(tmp_path, **{"batch-size": 1, "seq-len": 1, "eval-batches": 1, "inner-steps": 1})
    for op in ("evaluate", "train", "prepare"):
        with pytest.raises(PolicyRefused, match="below the centre's minimum") as err:
            _request(worker, oracle, op)
        assert "eval-batches x batch-size x seq-len" in str(err.value)
    refused = _refusals(worker)
    assert [e["op"] for e in refused] == ["evaluate", "train", "prepare"]
    assert all(e["stage"] == "policy" and e["run"] == "pol" and e["violations"] for e in refused)
    assert worker._trainer is None  # no model was built, nothing was read or evaluated
    assert not (worker.state_dir / "pol").exists()
    assert [e["verdict"] for e in read_ledger(worker.egress.ledger)] == ["refused"] * 3  # nothing sent


def test_a_request_inside_the_policy_is_served(worker, tmp_path):
    reply, out = _request(worker, _config(tmp_path))
    assert reply["status"] == "ok" and PARAMS_KEY in out
    assert _refusals(worker) == []


def test_the_request_budget_per_run_runs_out(worker, tmp_path):
    _with(worker, Policy(max_requests_per_run=2))
    cfg = _config(tmp_path)
    _request(worker, cfg, "train", 1)
    _request(worker, cfg, "evaluate", 1)
    with pytest.raises(PolicyRefused, match="used its budget of 2"):
        _request(worker, cfg, "train", 2)
    with pytest.raises(PolicyRefused, match="used its budget of 2"):
        _request(worker, cfg, "evaluate", 2)
    assert len(_refusals(worker)) == 2
    _request(worker, _config(tmp_path, **{"run-name": "pol-b"}), "evaluate")  # another run: its own budget
    _with(worker, Policy(max_requests_total=1))  # ... unless the operator caps all runs together
    _request(worker, _config(tmp_path, **{"run-name": "pol-c"}), "evaluate")
    with pytest.raises(PolicyRefused, match="budget of 1 train and evaluate requests \\(all runs\\)"):
        _request(worker, _config(tmp_path, **{"run-name": "pol-d"}), "evaluate")
    assert worker.handle({"op": "ping"}, {})[0]["status"] == "ok"  # health checks are not budgeted


@pytest.mark.parametrize(("key", "value", "ok"), [("inner-lr", 0.2, False), ("inner-lr", 1e-7, False),
                                                  ("inner-lr", 0.1, True), ("inner-weight-decay", 1.5, False),
                                                  ("inner-weight-decay", 1.0, True)])
def test_learning_rate_and_weight_decay_bounds(worker, tmp_path, key, value, ok):
    cfg = _config(tmp_path, **{key: value})
    if ok:
        assert _request(worker, cfg, "evaluate")[0]["status"] == "ok"
        return
    with pytest.raises(PolicyRefused, match=f"'{key}' = .* outside the centre's bounds"):
        _request(worker, cfg, "evaluate")
    assert _refusals(worker)[0]["violations"][0].startswith(f"run-config key '{key}'")


def test_models_keys_and_values_allowed_by_the_operator(worker, tmp_path):
    _with(worker, Policy(models=("small",), allowed_values={"compression": ("int8",)}))
    with pytest.raises(PolicyRefused) as err:
        _request(worker, _config(tmp_path), "evaluate")
    assert "model 'tiny' is not allowed" in str(err.value)
    assert "'compression' = 'none' is not allowed" in str(err.value)
    _with(worker, Policy(allowed_keys=("model", "rounds")))
    with pytest.raises(PolicyRefused, match="are not allowed here"):
        _request(worker, _config(tmp_path), "evaluate")


# --------------------------------------------------------------- clip + noise
def test_privatise_clips_the_update_norm_and_adds_calibrated_noise():
    rng = np.random.default_rng(0)
    sent = rng.standard_normal(50_000).astype(np.float32)
    trained = sent - rng.standard_normal(50_000).astype(np.float32)  # update norm ~ 224
    clip_only = Policy(update_clip=1.0)
    d = sent.astype(np.float64) - clip_only.privatise(sent, trained)
    assert abs(np.linalg.norm(d) - 1.0) < 1e-3  # clipped to the bound, direction kept
    assert np.corrcoef(d, sent - trained)[0, 1] > 0.999
    small = sent - 1e-4 * np.ones_like(sent)  # norm ~ 0.022 < clip: unchanged
    assert np.allclose(clip_only.privatise(sent, small), small, atol=1e-6)

    noisy = Policy(update_clip=1.0, update_noise_multiplier=0.5)
    d = sent.astype(np.float64) - noisy.privatise(sent, trained, np.random.default_rng(1))
    clipped = (sent - trained) / np.linalg.norm(sent - trained)
    noise = d - clipped
    assert abs(noise.std() - 0.5) < 0.01 and abs(noise.mean()) < 0.01  # std = multiplier x clip
    assert Policy().privatise(sent, trained) is trained  # off by default


def test_the_worker_sends_the_clipped_update(worker, tmp_path):
    _with(worker, Policy(update_clip=0.01))
    sent = _weights()[PARAMS_KEY]
    _, out = _request(worker, _config(tmp_path))
    assert np.linalg.norm(sent.astype(np.float64) - out[PARAMS_KEY]) <= 0.01 + 1e-5
    _with(worker, Policy(update_clip=0.01, update_noise_multiplier=1.0))
    _, noisy = _request(worker, _config(tmp_path, **{"run-name": "pol2"}))
    residual = sent.astype(np.float64) - noisy[PARAMS_KEY]
    assert abs(residual.std() - 0.01) < 0.001  # the noise (std 0.01 per value) dominates the clipped update


# ------------------------------------------------------------------ the file
def test_policy_file_toml_and_yaml_and_errors(tmp_path):
    toml = tmp_path / "policy.toml"
    toml.write_text('min-train-tokens = 65536\ninner-lr = [1e-5, 1e-2]\nmodels = ["small"]\n'
                    'update-clip = 1.0\nupdate-noise-multiplier = 0.5\n[allowed-values]\ncompression = ["int8"]\n')
    p = Policy.load(toml)
    assert (p.min_train_tokens, p.inner_lr, p.models) == (65536, (1e-5, 1e-2), ("small",))
    assert p.allowed_values == {"compression": ("int8",)} and p.update_noise_multiplier == 0.5
    yaml = tmp_path / "policy.yaml"
    yaml.write_text("max-requests-per-run: 7\nread-timeout: 5\n")
    assert Policy.load(yaml).max_requests_per_run == 7
    bad = tmp_path / "bad.toml"
    for text, match in [("min-tokens = 1", "unknown policy key"), ("inner-lr = [1.0, 0.1]", "low <= high"),
                        ("update-noise-multiplier = 1.0", "needs 'update-clip'"),
                        ('[allowed-values]\nrun-nam = ["x"]', "does not exist"), ("models = ['huge']", "choose")]:
        bad.write_text(text)
        with pytest.raises(PolicyError, match=match):
            Policy.load(bad)
    with pytest.raises(PolicyError, match="not found"):
        Policy.load(tmp_path / "missing.toml")


def test_the_message_limit_follows_the_largest_model():
    n = sum(t.numel() for t in build_model("tiny", seed=0).state_dict().values())
    assert largest_model_bytes() > 4 * n * 1000  # the base model, not the tiny one
    assert Policy().message_limit > largest_model_bytes()
    assert Policy(max_message_bytes=1234).message_limit == 1234
