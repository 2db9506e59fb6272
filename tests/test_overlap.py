"""overlap-steps: a centre trains the next round's first k steps on its own model while the
server aggregates, then adds that progress onto the global model (pure torch, tiny model)."""

from __future__ import annotations

import pytest
import torch

from clients.training import CentreTrainer
from clients.worker import CentreWorker
from models.config import ConfigError, RunConfig, load_defaults
from models.gpt import build_model
from models.packing import PARAMS_KEY, pack, unpack

H = 4


def _cfg(run_dir, overlap: int, rounds: int = 4) -> RunConfig:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": rounds, "inner-steps": H,
                                   "overlap-steps": overlap, "batch-size": 4, "inner-warmup-steps": 2,
                                   "threads": 1, "eval-batches": 1, "run-dir": str(run_dir), "run-name": "ov"})


def _clone(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_more_overlap_than_a_round_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'overlap-steps' \\(5\\) exceeds 'inner-steps' \\(4\\)"):
        _cfg(tmp_path, overlap=H + 1)


def test_steps_trained_ahead_are_added_onto_the_global_model(tmp_path, corpora):
    """With k = H the whole round was trained ahead: the reply is the new global model plus
    exactly the progress made from the centre's own end of the previous round."""
    t = CentreTrainer("fr-genci", corpora["fr-genci"], tmp_path / "state", _cfg(tmp_path, overlap=H))
    g1 = _clone(t.model.state_dict())
    t.load_global(g1)
    end1 = _clone(t.train_round(1).state)
    ahead = t.train_ahead(2)
    assert ahead is not None and ahead.round == 2 and len(ahead.step_seconds) == H
    end_ahead = _clone(t.model.state_dict())  # where the steps ahead ended (the model, until a load)
    assert any(not torch.equal(end_ahead[k], end1[k]) for k in end1)
    for k in end1:  # their progress, kept apart from the model's tensors
        assert torch.equal(ahead.delta[k], end_ahead[k] - end1[k]), k
    g2 = {k: v + 0.01 for k, v in end1.items()}  # whatever the server made of round 1
    t.load_global(g2)
    res = t.train_round(2, ahead)
    assert res.metrics["steps-ahead"] == H and len(res.step_seconds) == H
    for k in g2:
        assert torch.equal(res.state[k], g2[k] + (end_ahead[k] - end1[k])), k
    assert res.metrics["compute-seconds"] >= ahead.compute > 0


def test_a_restarted_worker_trains_the_same_steps_ahead_from_disk(tmp_path, corpora):
    """The steps ahead are a fixed number from a saved state, so a round re-run after a
    restart (of the worker or the coordinator) gives bit-identical weights."""
    cfg, data = _cfg(tmp_path, overlap=2), corpora["fr-genci"]
    warm = CentreTrainer("fr-genci", data, tmp_path / "state", cfg)
    g = _clone(warm.model.state_dict())
    for rnd in (1, 2):
        ahead = warm.train_ahead(rnd)
        assert (ahead is None) == (rnd == 1)  # nothing to start from before round 1
        warm.load_global(g)
        g = _clone(warm.train_round(rnd, ahead).state)
    ahead3 = warm.train_ahead(3)
    delta3 = _clone(ahead3.delta)  # the trainer's kept copy: its next round writes over it
    warm.load_global(g)
    first = _clone(warm.train_round(3, ahead3).state)

    cold = CentreTrainer("fr-genci", data, tmp_path / "state", cfg)  # a new process, same disk
    ahead = cold.train_ahead(3)
    assert ahead is not None
    for k in delta3:
        assert torch.equal(ahead.delta[k], delta3[k]), k
    cold.load_global(g)
    again = cold.train_round(3, ahead).state
    for k in first:
        assert torch.equal(first[k], again[k]), k
    assert any(not torch.equal(first[k], g[k]) for k in first)


def test_worker_trains_ahead_in_the_background_and_gets_the_same_result(tmp_path, corpora):
    """The serving worker trains ahead in a thread after each train reply; a worker used
    in-process (no serve loop) trains the same steps when the round comes. Same weights."""
    rc = _cfg(tmp_path, overlap=3, rounds=3).to_mapping()
    serving = CentreWorker("fr-genci", corpora["fr-genci"], tmp_path / "a")
    inline = CentreWorker("fr-genci", corpora["fr-genci"], tmp_path / "b")
    g = pack(build_model("tiny", seed=0).state_dict())
    for rnd in (1, 2, 3):
        header = {"op": "train", "round": rnd, "run-config": rc}
        reply_a, out_a = serving.handle(header, {PARAMS_KEY: g.copy()})
        serving.after_reply()
        assert (serving._ahead_thread is not None) == (rnd < 3)  # none after the last round
        reply_b, out_b = inline.handle(header, {PARAMS_KEY: g.copy()})
        assert reply_a["metrics"]["steps-ahead"] == reply_b["metrics"]["steps-ahead"] == (3 if rnd > 1 else 0)
        assert (out_a[PARAMS_KEY] == out_b[PARAMS_KEY]).all(), rnd
        template = build_model("tiny", seed=0).state_dict()
        g = pack({k: (v + w) / 2 for (k, v), w in zip(unpack(out_a[PARAMS_KEY], template).items(),
                                                     unpack(g, template).values(), strict=True)})
    reply, _ = serving.handle({"op": "evaluate", "round": 3, "run-config": rc}, {PARAMS_KEY: g})
    assert reply["status"] == "ok" and reply["metrics"]["eval-loss"] > 0
