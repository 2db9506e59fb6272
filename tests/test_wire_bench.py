"""The data-plane benchmark (benchmarks/wire.py): its figures and verdicts, and a real smoke run."""

from __future__ import annotations

import json

import pytest

from benchmarks import wire


def _round(wall: float, work: float, agg: float, ckpt: float, moved: int) -> dict:
    return {"round": 2, "wall-seconds": wall, "aggregation-seconds": agg, "checkpoint-seconds": ckpt,
            "bytes-sent": moved // 2, "bytes-received": moved // 2,
            "centres": {"a": {"compute-seconds": work - 0.5, "eval-seconds": 0.5, "peak-memory-bytes": 1e9},
                        "b": {"compute-seconds": 1.0, "eval-seconds": 0.1, "peak-memory-bytes": 2e9}}}


def test_throughput_is_bytes_over_what_is_left_of_the_round():
    run = {"rounds": [_round(9.0, 1.0, 0.0, 0.0, 0), _round(5.0, 2.0, 0.5, 0.5, 4_000_000_000)],
           "final": {"eval-loss-mean": 3.0}}
    f = wire.wire_figures(run)  # round 1 (no weights) is left out
    assert f["rounds"][0]["moving"] == pytest.approx(2.0) and f["bytes-per-second"] == pytest.approx(2e9)
    assert f["worker-peak-rss-bytes"] == 2e9 and f["round-seconds"] == 5.0


def test_the_coordinators_memory_is_counted_in_model_sizes_above_the_bare_process():
    run = {"rounds": [_round(9.0, 1.0, 0.0, 0.0, 0), {**_round(5.0, 2.0, 0.5, 0.5, 4_000_000_000),
                                                       "server-peak-rss-bytes": 4.5e9}],
           "events": [{"event": "memory", "rss-before-model-bytes": 0.5e9}], "final": {"eval-loss-mean": 3.0}}
    f = wire.wire_figures(run)  # 2 centres: the model went out twice and came back twice
    assert f["model-bytes"] == 1e9 and f["coordinator-model-multiple"] == pytest.approx(4.0)


@pytest.mark.parametrize(("bps", "seconds", "ratio", "models", "want"), [
    (1.2e9, 3.5, 0.93, 4.01, ["met", "met", "met", "met"]),
    (0.9e9, 4.5, 0.85, 4.2, ["missed", "missed", "missed", "missed"])])
def test_verdicts_on_both_sides_of_each_target(bps, seconds, ratio, models, want):
    res = {"plan": {"model": "base"},
           "scenarios": {"stream fp32": {"bytes-per-second": bps, "round-seconds": seconds, "centres": 2,
                                         "model-bytes": 514e6, "coordinator-model-multiple": models},
                         "flower fp32": {"bytes-per-second": 5.4e7, "round-seconds": 43.0}},
           "ratio": {"ratio": ratio}}
    assert [v for v, _ in wire.targets(res)] == want


def test_the_ratio_verdict_is_the_specified_plans_and_the_longer_plan_is_reported_beside_it():
    res = {"plan": {"model": "base"}, "scenarios": {},
           "ratio": {"ratio": 0.80, "plan": {"inner-steps": 20}, "federated-tokens-per-second": 120.0,
                     "bare-loop-tokens-per-second": 150.0, "round-seconds": [20.0, 17.0]},
           "ratio-long": {"ratio": 0.95, "plan": {"inner-steps": 40}, "federated-tokens-per-second": 142.5,
                          "bare-loop-tokens-per-second": 150.0, "round-seconds": [36.0, 33.0]}}
    assert wire.targets(res) == [("missed", "real-size ratio >= 0.90 of the bare loop: 0.800 (ratio)")]
    text = wire.report(res)
    assert "ratio **0.800**" in text and "ratio **0.950**" in text and "H=40" in text


def test_quick_wire_bench_runs_both_data_planes(tmp_path):
    assert wire.main(["--quick", "--out", str(tmp_path), "--tag", "w"]) == 0
    res = json.loads((tmp_path / "w.json").read_text())
    stream, flower = res["scenarios"]["stream fp32"], res["scenarios"]["flower fp32"]
    assert stream["data-plane"]["bytes-received"] > 0 and flower["data-plane"] is None
    assert stream["bytes-per-second"] > 0 and flower["bytes-per-second"] > 0
    assert "effective throughput" in (tmp_path / "w.md").read_text()
