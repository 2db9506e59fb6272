"""Where a (resumed) run starts: server/app.py `start_point` over real checkpoint files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from models.config import ConfigError, RunConfig, load_defaults
from models.gpt import build_model
from models.packing import pack
from server.app import start_point
from server.checkpoint import CheckpointError, save_checkpoint
from server.runlog import RunLog


def _cfg(run_dir, resume: bool) -> RunConfig:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "run-dir": str(run_dir), "resume": resume})


def _save(run_dir, rnd: int, cfg: RunConfig) -> dict[str, torch.Tensor]:
    model = {k: v.float() + rnd for k, v in build_model("tiny", seed=0).state_dict().items()}
    momentum = {k: torch.full_like(v, float(rnd)) for k, v in model.items()}
    save_checkpoint(run_dir, rnd, model, momentum, cfg.to_mapping())
    return model


def _damage(run_dir, rnd: int, how: str) -> str:
    path = run_dir / "checkpoints" / f"round-{rnd:04d}" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if how == "truncate" else data[:-8] + b"\xff" * 8)
    return str(path)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_resume_skips_a_damaged_latest_checkpoint(tmp_path, caplog, how):
    cfg = _cfg(tmp_path, resume=True)
    good = _save(tmp_path, 1, cfg)
    _save(tmp_path, 2, cfg)
    bad_file = _damage(tmp_path, 2, how)
    runlog = RunLog(tmp_path, cfg.to_mapping(), resume=True)

    with caplog.at_level(logging.ERROR, logger="bridgepool"):
        outer, start, broadcast = start_point(cfg, tmp_path, runlog)

    assert start == 2  # round 2 is re-run from round 1's weights and momentum
    assert np.array_equal(broadcast.base, pack(good))  # a checkpoint without b: b = the model
    assert all(torch.equal(outer.state()[k], v) for k, v in good.items())
    restored = outer.optimizer_state()  # key by key: an empty dict must not pass (issue 19)
    assert set(restored) == set(outer.params) and restored
    for k, buf in restored.items():
        assert torch.equal(buf, torch.ones_like(good[k])), k
    assert bad_file in caplog.text and "corrupted or truncated" in caplog.text
    events = {e["event"]: e for e in runlog.data["events"]}
    assert bad_file in events["checkpoint-refused"]["error"]
    assert events["resumed-from"]["round"] == 1


def test_resume_refuses_when_no_checkpoint_verifies(tmp_path):
    cfg = _cfg(tmp_path, resume=True)
    _save(tmp_path, 1, cfg)
    _damage(tmp_path, 1, "truncate")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        start_point(cfg, tmp_path, RunLog(tmp_path, cfg.to_mapping(), resume=True))


def test_fresh_start_and_resume_without_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, resume=True)
    assert start_point(cfg, tmp_path, RunLog(tmp_path, cfg.to_mapping()))[1] == 1
    _save(tmp_path, 1, cfg)
    fresh = _cfg(tmp_path, resume=False)
    outer, start, _ = start_point(fresh, tmp_path, RunLog(tmp_path, fresh.to_mapping()))
    assert start == 1 and outer.optimizer_state() == {}  # resume off: checkpoints ignored


@pytest.mark.parametrize(("key", "value"), [("model", "small"), ("strategy", "fedavg")])
def test_resume_under_another_model_or_strategy_is_refused(tmp_path, key, value):
    saved = _cfg(tmp_path, resume=True)
    _save(tmp_path, 1, saved)
    other = saved.replace(**{key: value})
    with pytest.raises(ConfigError, match=f"another {key} '.*' -> '{value}'"):
        start_point(other, tmp_path, RunLog(tmp_path, other.to_mapping(), resume=True))
    outer, start, _ = start_point(saved, tmp_path, RunLog(tmp_path, saved.to_mapping(), resume=True))
    assert start == 2  # the same settings resume
