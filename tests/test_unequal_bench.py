"""The unequal-centres benchmark (benchmarks/unequal.py): its figures and verdicts from a run.json.
(The real runs are `bridgepool bench --unequal [--quick]`; tests/test_round_budget.py runs a
budgeted federation of unequal centres end to end.)"""

from __future__ import annotations

import pytest

from benchmarks import unequal


def _run(steps: dict[str, float], compute: dict[str, float], wall: float, loss: float) -> dict:
    rounds = []
    for rnd in (1, 2):
        rounds.append({"round": rnd, "time": 100.0 + rnd * wall, "wall-seconds": wall,
                       "tokens": 10 * sum(steps.values()),
                       "idle-seconds": {c: wall - compute[c] for c in steps},
                       "centres": {c: {"inner-steps": steps[c], "tokens": 10 * steps[c], "compute-seconds": compute[c],
                                       "eval-loss": loss}
                                   for c in steps}})
    return {"rounds": rounds, "final": {"eval-loss-mean": loss, "centres": {c: {"eval-loss": loss} for c in steps}}}


def test_figures_and_both_sides_of_each_target():
    fixed = unequal.figures(_run({"a": 5, "b": 5}, {"a": 1.0, "b": 3.0}, 4.0, 3.0))
    assert fixed["wall-seconds"] == 8.0 and fixed["tokens-per-second"] == pytest.approx(200 / 8)
    assert fixed["centres"]["a"]["idle-fraction"] == pytest.approx(0.75)
    assert fixed["centres"]["b"]["steps-per-round"] == [5, 5] and fixed["centres"]["b"]["tokens"] == 100
    assert [x[0] for x in fixed["loss-after-round"]] == [4.0, 8.0]
    good = unequal.figures(_run({"a": 15, "b": 5}, {"a": 3.0, "b": 3.0}, 4.0, 2.9))
    bad = unequal.figures(_run({"a": 6, "b": 5}, {"a": 3.0, "b": 3.0}, 4.0, 3.1))
    assert [v for v, _ in unequal.targets({"rows": {"fixed H": fixed, "budget": good}})] == ["met", "met"]
    assert [v for v, _ in unequal.targets({"rows": {"fixed H": fixed, "budget": bad}})] == ["missed", "missed"]


def test_loss_at_equal_wall_time_is_of_the_last_model_within_the_shorter_span():
    short = unequal.figures(_run({"a": 5}, {"a": 1.0}, 4.0, 3.0))  # rounds end at 4 s and 8 s
    long = unequal.figures(_run({"a": 5}, {"a": 1.0}, 5.0, 2.0))  # at 5 s and 10 s
    eq = unequal.at_equal_wall({"short": short, "long": long})
    assert eq["limit-seconds"] == 8.0
    assert (eq["rows"]["short"]["round"], eq["rows"]["long"]["round"]) == (2, 1)
    assert eq["rows"]["long"]["seconds"] == 5.0 and eq["rows"]["long"]["eval-loss"] == {"a": 2.0}
