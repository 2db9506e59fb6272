"""The benchmark's target verdicts (benchmarks/report.py `targets`), on both sides of each
threshold, from synthetic figures: each verdict must be able to say "missed" (issue 19)."""

from __future__ import annotations

import copy

import pytest

from benchmarks.report import DEMO_LOCAL_ROW, SEPARATE, figures, targets

DEMO = "DiLoCo H=8 (demo default)"
SEP = SEPARATE.format(cores=1)


def _row(tokens: float, round_wall: float, bytes_: float = 0.0, loss: float = 3.0, rounds: int = 4) -> dict:
    return {"tokens": tokens, "wall": round_wall + 1.0, "round-wall": round_wall, "compute": round_wall * 0.9,
            "bytes": bytes_, "rounds": rounds, "eval": {"fr-genci": loss, "de-lrz": loss}}


def _passing() -> dict:
    """Every target met with a margin. DDP sends 800 bytes/token; DiLoCo H=8 at most 100."""
    tok = 8000.0
    return {
        "scenarios": {
            "centralised": _row(tok, 10.0, loss=3.0),
            "all-reduce (DDP gloo)": _row(tok, 10.0, bytes_=800 * tok),
            "local loop (no federation)": _row(tok, 10.0),
            DEMO_LOCAL_ROW: _row(tok, 10.0),
            DEMO: _row(tok, 10.0 / 0.99, bytes_=50 * tok, loss=3.0),
            "DiLoCo H=8": _row(tok, 10.0, bytes_=50 * tok, loss=3.0),
            "DiLoCo H=8 int8": _row(tok, 10.0, bytes_=0.25 * 50 * tok, loss=3.0),
            DEMO_LOCAL_ROW + SEP: _row(tok, 20.0),
            DEMO + SEP: _row(tok, 20.0 / 0.99),
        },
        "fixed-cost": {"overhead-per-round": 1.0},
        "separate-machines": {"cores": 1},
    }


def _verdicts(res: dict) -> dict[str, str]:
    return {what: verdict for what, _, verdict in targets(res)}


def _one(res: dict, starts: str) -> str:
    (verdict,) = [v for k, v in _verdicts(res).items() if k.startswith(starts)]
    return verdict


def test_all_met_when_every_figure_is_inside():
    verdicts = _verdicts(_passing())
    assert len(verdicts) == 7 and set(verdicts.values()) == {"met"}, verdicts


def _set_round_wall(res: dict, name: str, wall: float) -> dict:
    res = copy.deepcopy(res)
    res["scenarios"][name]["round-wall"] = wall
    return res


@pytest.mark.parametrize(("ratio", "verdict"), [(0.951, "met"), (0.949, "missed")])
def test_throughput_ratio_target_both_sides(ratio, verdict):
    res = _set_round_wall(_passing(), DEMO, 10.0 / ratio)  # the local loop: 800 tok/s
    assert _one(res, "throughput ratio >= 95 % for the demo's") == verdict
    res = _set_round_wall(_passing(), DEMO + SEP, 20.0 / ratio)
    assert _one(res, "throughput ratio >= 95 %, each centre on its own") == verdict


@pytest.mark.parametrize(("seconds", "verdict"), [(1.5, "met"), (1.51, "missed")])
def test_fixed_overhead_both_sides(seconds, verdict):
    res = _passing()
    res["fixed-cost"]["overhead-per-round"] = seconds
    assert _one(res, "fixed overhead per round") == verdict


@pytest.mark.parametrize(("loss", "verdict"), [(3.0 * 1.049, "met"), (3.0 * 1.051, "missed")])
def test_held_out_loss_against_centralised_both_sides(loss, verdict):
    res = _passing()
    for name in ("DiLoCo H=8",):
        res["scenarios"][name]["eval"] = {"fr-genci": loss, "de-lrz": loss}
    assert _one(res, "federated held-out loss within 5 %") == verdict


@pytest.mark.parametrize(("per_token", "verdict"), [(100.0, "met"), (100.5, "missed")])
def test_bytes_per_token_against_ddp_both_sides(per_token, verdict):
    res = _passing()
    res["scenarios"]["DiLoCo H=8"]["bytes"] = per_token * res["scenarios"]["DiLoCo H=8"]["tokens"]
    res["scenarios"]["DiLoCo H=8 int8"]["bytes"] = 0.25 * res["scenarios"]["DiLoCo H=8"]["bytes"]
    assert _one(res, "DiLoCo H=8: bytes/token") == verdict


@pytest.mark.parametrize(("ratio", "dloss", "verdict"), [(0.259, 0.0099, "met"), (0.261, 0.0, "missed"),
                                                         (0.25, 0.0101, "missed"), (0.25, -0.0101, "missed")])
def test_int8_bytes_and_loss_both_sides(ratio, dloss, verdict):
    res = _passing()
    fp32 = res["scenarios"]["DiLoCo H=8"]
    res["scenarios"]["DiLoCo H=8 int8"]["bytes"] = ratio * fp32["bytes"]
    loss = 3.0 * (1 + dloss)
    res["scenarios"]["DiLoCo H=8 int8"]["eval"] = {"fr-genci": loss, "de-lrz": loss}
    assert _one(res, "DiLoCo H=8 int8: total bytes") == verdict


def test_separate_machines_not_measured_is_said():
    res = _passing()
    res["separate-machines"] = {"cores": 1, "not-run": "no cgroup v2 here"}
    assert _one(res, "throughput ratio >= 95 %, each centre on its own") == "not measured"


def test_compute_share_is_compute_over_round_wall():
    f = figures(_row(1000.0, 10.0))
    assert f["compute-share"] == pytest.approx(0.9) and f["tokens-per-second"] == pytest.approx(100.0)
