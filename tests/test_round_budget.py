"""Time-budgeted rounds (round-seconds): each centre trains until its compute for the round
reaches the budget, within [min-inner-steps, max-inner-steps]; a re-run round replays the
recorded count; the server weights the unequal updates by their tokens (pure torch, tiny model)."""

from __future__ import annotations

import json

import pytest
import torch

from clients.training import STEPS_FILE, CentreTrainer
from deploy.report import centre_series, plot_run
from models.config import ConfigError, RunConfig, load_defaults
from server.aggregation import mean_pseudo_gradient
from server.metrics import ServerMetrics, centre_balance
from server.validation import UpdateRejected, check_metrics, token_cap

B, T = 4, 32  # batch-size; the tiny model's context (seq-len 0)


def _cfg(run_dir, **over) -> RunConfig:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": 4, "inner-steps": 4,
                                   "batch-size": B, "inner-warmup-steps": 2, "threads": 1, "eval-batches": 1,
                                   "run-dir": str(run_dir), "run-name": "budget", **over})


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(trainer: CentreTrainer, global_state: dict, rnd: int) -> tuple[dict[str, torch.Tensor], dict]:
    trainer.load_global(global_state)
    res = trainer.train_round(rnd)
    return {k: v.clone() for k, v in res.state.items()}, res.metrics


@pytest.mark.parametrize(("over", "needle"), [
    ({"round-seconds": 2.0, "overlap-steps": 1}, "'round-seconds' and 'overlap-steps' cannot both be set"),
    ({"round-seconds": -1.0}, "'round-seconds' must be >= 0"),
    ({"min-inner-steps": 5, "max-inner-steps": 4}, "'max-inner-steps' \\(4\\) is below 'min-inner-steps' \\(5\\)"),
    ({"min-inner-steps": 0}, "'min-inner-steps' must be >= 1"),
])
def test_bad_budgets_are_refused_naming_the_key(tmp_path, over, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(tmp_path, **over)


def test_the_budget_bounds_the_steps_and_the_count_continues_across_rounds(tmp_path, corpora):
    data = corpora["fr-genci"]
    # A budget spent at once: the minimum. A budget never spent: the maximum.
    short = CentreTrainer("fr-genci", data, tmp_path / "a",
                          _cfg(tmp_path, **{"round-seconds": 1e-9, "min-inner-steps": 2, "max-inner-steps": 50}))
    long = CentreTrainer("fr-genci", data, tmp_path / "b",
                         _cfg(tmp_path, **{"round-seconds": 1e6, "min-inner-steps": 1, "max-inner-steps": 3}))
    g = {k: v.clone() for k, v in short.model.state_dict().items()}
    for trainer, steps in ((short, 2), (long, 3)):
        _, m1 = _train(trainer, g, 1)
        _, m2 = _train(trainer, g, 2)
        assert m1["inner-steps"] == m2["inner-steps"] == steps
        assert m1["tokens"] == steps * B * T and m1["num-examples"] == steps * B
        # The step count is the centre's own: round 2 starts where round 1 ended.
        record = json.loads((trainer.state_dir / STEPS_FILE).read_text())
        assert record == {"1": [0, steps], "2": [steps, steps]}
        assert json.loads((trainer.state_dir / "position.json").read_text())["next-step"] == 2 * steps


def test_a_slower_centre_takes_fewer_steps_in_the_same_budget(tmp_path, corpora):
    data = corpora["fr-genci"]
    cfg = _cfg(tmp_path, **{"round-seconds": 0.6, "min-inner-steps": 1, "max-inner-steps": 500})
    fast = CentreTrainer("fr-genci", data, tmp_path / "fast", cfg)
    slow = CentreTrainer("fr-genci", data, tmp_path / "slow", cfg, speed=0.25)
    g = {k: v.clone() for k, v in fast.model.state_dict().items()}
    _, mf = _train(fast, g, 1)
    _, ms = _train(slow, g, 1)
    for m in (mf, ms):  # stopped by the budget, not by max-inner-steps: within half a step of it
        assert 1 <= m["inner-steps"] < 500 and m["compute-seconds"] >= 0.6 - m["step-seconds-max"]
    assert ms["inner-steps"] < mf["inner-steps"], (ms["inner-steps"], mf["inner-steps"])
    assert ms["tokens"] < mf["tokens"]
    with pytest.raises(ValueError, match="speed must be in \\(0, 1\\]"):
        CentreTrainer("fr-genci", data, tmp_path / "x", cfg, speed=2.0)


def test_re_run_rounds_replay_their_recorded_steps_exactly(tmp_path, corpora):
    """The run is resumed from round 1's checkpoint (round 2's was damaged) and rounds 2 and 3 are
    sent again, to a restarted worker that is now much slower: the clock would give fewer steps,
    the record gives the same, and the same weights."""
    data = corpora["fr-genci"]
    cfg = _cfg(tmp_path, **{"round-seconds": 0.3, "min-inner-steps": 1, "max-inner-steps": 200})
    warm = CentreTrainer("fr-genci", data, tmp_path / "state", cfg)
    g1 = {k: v.clone() for k, v in warm.model.state_dict().items()}
    g2, m1 = _train(warm, g1, 1)
    g3, m2 = _train(warm, g2, 2)
    end3, m3 = _train(warm, g3, 3)
    cold = CentreTrainer("fr-genci", data, tmp_path / "state", cfg, speed=0.05)
    again2, m2b = _train(cold, g2, 2)
    again3, m3b = _train(cold, again2, 3)
    assert (m2b["inner-steps"], m3b["inner-steps"]) == (m2["inner-steps"], m3["inner-steps"])
    assert m2b["tokens"] == m2["tokens"]
    for k in g3:
        assert torch.equal(g3[k], again2[k]) and torch.equal(end3[k], again3[k]), k
    # Round 4 is new: it continues the count from round 3's end, on the clock again.
    _, m4 = _train(cold, again3, 4)
    record = json.loads((cold.state_dir / STEPS_FILE).read_text())
    assert record["4"] == [m1["inner-steps"] + m2["inner-steps"] + m3["inner-steps"], m4["inner-steps"]]


def test_the_token_cap_follows_max_inner_steps_under_a_budget(tmp_path):
    fixed = _cfg(tmp_path)
    budget = _cfg(tmp_path, **{"round-seconds": 5.0, "max-inner-steps": 10})
    assert token_cap(fixed) == 4 * B * T and token_cap(budget) == 10 * B * T
    ok = {"tokens": 10.0 * B * T, "train-loss": 1.0, "eval-loss": 1.0}
    check_metrics(ok, token_cap(budget))
    with pytest.raises(UpdateRejected, match="max-inner-steps"):
        check_metrics({**ok, "tokens": 11.0 * B * T}, token_cap(budget))


def test_unequal_updates_are_weighted_by_their_tokens(tmp_path, corpora):
    """Two centres, one at a third of the steps: the mean pseudo-gradient weights each by tokens."""
    data = corpora["fr-genci"]
    many = CentreTrainer("fr-genci", data, tmp_path / "m", _cfg(tmp_path, **{"round-seconds": 1e6,
                                                                            "max-inner-steps": 6}))
    few = CentreTrainer("fr-genci", data, tmp_path / "f", _cfg(tmp_path, **{"round-seconds": 1e-9,
                                                                           "min-inner-steps": 2}))
    g = {k: v.clone() for k, v in many.model.state_dict().items()}
    s_many, m_many = _train(many, g, 1)
    s_few, m_few = _train(few, g, 1)
    assert (m_many["tokens"], m_few["tokens"]) == (6 * B * T, 2 * B * T)
    mean = mean_pseudo_gradient(g, [s_many, s_few], [m_many["tokens"], m_few["tokens"]])
    for k in g:
        want = (0.75 * (g[k] - s_many[k]) + 0.25 * (g[k] - s_few[k]))
        assert torch.allclose(mean[k], want, atol=1e-6), k


def test_idle_seconds_and_spread_reach_the_record_and_prometheus():
    record = centre_balance(10.0, {"a": {"inner-steps": 30.0, "compute-seconds": 8.0, "eval-seconds": 1.0},
                                   "b": {"inner-steps": 10.0, "compute-seconds": 9.5, "eval-seconds": 0.4}})
    assert record["inner-steps"] == {"a": 30.0, "b": 10.0} and record["inner-steps-spread"] == 3.0
    assert record["idle-seconds"] == pytest.approx({"a": 1.0, "b": 0.1})
    metrics = ServerMetrics("r")
    metrics.observe_round({"round": 1, "wall-seconds": 10.0, "aggregation-seconds": 0.1, "tokens": 1.0,
                           "replied": 2, "failed": {}, "bytes-sent": 0, "bytes-received": 0,
                           "centres": {"a": {}, "b": {}}, **record})
    get = metrics.registry.get_sample_value
    assert get("bridgepool_centre_round_inner_steps", {"run": "r", "centre": "b"}) == 10.0
    assert get("bridgepool_centre_round_idle_seconds", {"run": "r", "centre": "a"}) == pytest.approx(1.0)
    assert get("bridgepool_round_inner_steps_spread", {"run": "r"}) == 3.0


def test_a_federation_of_unequal_centres_on_a_budget_resumes(tmp_path, corpora):
    """Real Flower federation, de-lrz emulated 4x slower, 1 s budget: both centres reply each round
    with the steps their speed allowed, recorded on their own disks as in run.json; killed after
    round 2 and resumed, round 3 continues each centre's own step count."""
    from dataclasses import replace

    from tests.conftest import make_centres
    from tests.test_federation import run_federation, tiny_config

    run_dir = tmp_path / "run"
    fast, slow = make_centres(run_dir, corpora, 2)
    centres = [fast, replace(slow, speed=0.25)]
    cfg = tiny_config(run_dir, **{"round-seconds": 1.0, "min-inner-steps": 2, "max-inner-steps": 400})
    run_federation(run_dir, centres, cfg, stop_after_round=2)
    run = run_federation(run_dir, centres, cfg.replace(resume=True))

    assert run["status"] == "finished", run.get("message")
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3]
    assert any(e["event"] == "resumed-from" and e["round"] >= 2 for e in run["events"])
    for c in centres:
        record = json.loads((c.state_dir / run_dir.name / STEPS_FILE).read_text())
        steps = [r["inner-steps"][c.name] for r in run["rounds"]]
        assert [record[str(n)][1] for n in (1, 2, 3)] == steps, (c.name, record, steps)
        assert record["3"][0] == steps[0] + steps[1]  # the centre's own count went on after the resume
        for r in run["rounds"]:
            m = r["centres"][c.name]
            assert m["tokens"] == m["inner-steps"] * 8 * 32 and 0 <= r["idle-seconds"][c.name] < r["wall-seconds"]
    for r in run["rounds"]:
        assert r["inner-steps"][slow.name] < r["inner-steps"][fast.name], r["inner-steps"]
        assert r["inner-steps-spread"] > 1
        assert r["tokens"] == sum(m["tokens"] for m in r["centres"].values())
    # The throughput plot shows each centre's steps and idle seconds per round.
    series = centre_series(run)
    assert series[slow.name]["steps"] == [r["inner-steps"][slow.name] for r in run["rounds"]]
    assert series[fast.name]["idle"] == [r["idle-seconds"][fast.name] for r in run["rounds"]]
    assert all(p.stat().st_size > 0 for p in plot_run(run_dir))
