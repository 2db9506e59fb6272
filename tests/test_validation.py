"""Bad updates never reach aggregation: property tests over random malformed replies (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.packing import PARAMS_KEY
from server.aggregation import OuterOptimizer, aggregate
from server.app import _accept
from server.messaging import Exchange, Reply
from server.metrics import ServerMetrics
from server.validation import MAX_ABS_VALUE, UpdateRejected, decode_update, screen

REFERENCE = {"wte": torch.zeros(6, 4), "ln.bias": torch.zeros(4), "head": torch.zeros(3, 4)}
SIZE = sum(t.numel() for t in REFERENCE.values())
METRICS = {"tokens": 100.0, "train-loss": 2.0, "eval-loss": 2.1}
CAP = 1000.0  # the most tokens a reply may claim (validation.token_cap of the round)
MALFORMATIONS = ("short", "long", "matrix", "float64", "float16", "int32", "missing", "extra", "renamed",
                 "nan", "inf", "-inf", "huge", "metric-nan", "no-tokens", "tokens-3e38", "tokens-cap+1",
                 "tokens-inf", "no-train-loss", "no-eval-loss", "tokens-missing")
REASON = {"short": "shape", "long": "shape", "matrix": "shape", "float64": "dtype", "float16": "dtype",
          "int32": "dtype", "missing": "keys", "extra": "keys", "renamed": "keys", "nan": "non-finite",
          "inf": "non-finite", "-inf": "non-finite", "huge": "too-large", "metric-nan": "metrics",
          "no-tokens": "metrics", "tokens-3e38": "tokens-over-cap", "tokens-cap+1": "tokens-over-cap",
          "tokens-inf": "metrics", "no-train-loss": "missing-metric", "no-eval-loss": "missing-metric",
          "tokens-missing": "missing-metric"}


def _honest(seed: int, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(SIZE) * scale).astype(np.float32)


def malform(kind: str, vec: np.ndarray, where: int, huge: float) -> tuple[dict, dict]:
    arrays, metrics = {PARAMS_KEY: vec.copy()}, dict(METRICS)
    bad = arrays[PARAMS_KEY]
    if kind in ("nan", "inf", "-inf"):
        bad[where % SIZE] = float(kind)
    elif kind == "huge":
        bad[where % SIZE] = huge
    elif kind == "short":
        arrays[PARAMS_KEY] = bad[: -(1 + where % (SIZE - 1))]
    elif kind == "long":
        arrays[PARAMS_KEY] = np.concatenate([bad, np.zeros(1 + where % 7, np.float32)])
    elif kind == "matrix":
        arrays[PARAMS_KEY] = bad.reshape(2, -1)
    elif kind in ("float64", "float16", "int32"):
        arrays[PARAMS_KEY] = bad.astype(kind)
    elif kind == "missing":
        arrays = {}
    elif kind == "extra":
        arrays["extra"] = np.zeros(2, np.float32)
    elif kind == "renamed":
        arrays = {"weights": bad}
    elif kind == "metric-nan":
        metrics["train-loss"] = float("nan")
    elif kind == "no-tokens":
        metrics["tokens"] = 0.0 if where % 2 else -5.0
    elif kind == "tokens-3e38":  # issue 19: one centre claiming the whole mean's weight
        metrics["tokens"] = 3e38
    elif kind == "tokens-cap+1":
        metrics["tokens"] = CAP + 1.0
    elif kind == "tokens-inf":
        metrics["tokens"] = float("inf")
    elif kind in ("no-train-loss", "no-eval-loss", "tokens-missing"):  # issue 19: was a KeyError ending the run
        del metrics[{"no-train-loss": "train-loss", "no-eval-loss": "eval-loss", "tokens-missing": "tokens"}[kind]]
    return arrays, metrics


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(MALFORMATIONS), where=st.integers(0, 10_000), seed=st.integers(0, 2**16),
       huge=st.floats(MAX_ABS_VALUE * 1.01, 1e30) | st.floats(-1e30, -MAX_ABS_VALUE * 1.01),
       position=st.integers(0, 3))
def test_any_malformed_update_is_rejected_and_changes_nothing(kind, where, seed, huge, position):
    honest = [({PARAMS_KEY: _honest(seed + i)}, dict(METRICS)) for i in range(3)]
    bad = malform(kind, _honest(seed + 99), where, huge)
    replies = honest[:position] + [bad] + honest[position:]

    accepted, rejected = screen(replies, REFERENCE, max_norm_factor=10.0, max_tokens=CAP)

    assert set(rejected) == {position} and set(accepted) == set(range(4)) - {position}
    assert rejected[position].reason == REASON[kind], str(rejected[position])
    # The global model after the round is exactly the one the honest replies alone give.
    with_bad = _outer_step([accepted[i] for i in sorted(accepted)])
    alone = _outer_step([decode_update(a, REFERENCE) for a, _ in honest])
    for k in REFERENCE:
        assert torch.isfinite(with_bad[k]).all()
        assert torch.equal(with_bad[k], alone[k]), k


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**16), factor=st.floats(2.0, 50.0), excess=st.floats(1.05, 100.0),
       n=st.integers(3, 6))
def test_norm_far_above_the_median_is_rejected(seed, factor, excess, n):
    honest = [_honest(seed + i) for i in range(n - 1)]  # norms within a few % of each other
    norms = sorted(float(np.linalg.norm(h)) for h in honest)
    median = float(torch.tensor([*norms, 1e9]).median())  # the attacker is the largest
    direction = _honest(seed + 1000)
    attack = direction / np.linalg.norm(direction) * median * factor * excess
    replies = [({PARAMS_KEY: h}, dict(METRICS)) for h in honest] + [({PARAMS_KEY: attack.astype(np.float32)},
                                                                     dict(METRICS))]
    accepted, rejected = screen(replies, REFERENCE, max_norm_factor=factor, max_tokens=CAP)
    assert set(rejected) == {n - 1} and rejected[n - 1].reason == "norm-outlier"
    assert "max-norm-factor" in str(rejected[n - 1])
    assert len(accepted) == n - 1


def test_norm_check_off_or_too_few_updates():
    small, big = _honest(1), _honest(2, scale=100.0)
    two = [({PARAMS_KEY: small}, METRICS), ({PARAMS_KEY: big}, METRICS)]
    assert screen(two, REFERENCE, 10.0, CAP)[1] == {}  # a median of two says nothing
    three = [*two, ({PARAMS_KEY: _honest(3)}, METRICS)]
    assert set(screen(three, REFERENCE, 10.0, CAP)[1]) == {1}
    assert screen(three, REFERENCE, 0.0, CAP)[1] == {}  # max-norm-factor = 0: off


def test_decode_names_the_problem():
    with pytest.raises(UpdateRejected, match="float32") as err:
        decode_update({PARAMS_KEY: np.zeros(SIZE, np.float64)}, REFERENCE)
    assert err.value.reason == "dtype"


def test_rejections_are_logged_counted_and_recorded_by_centre(caplog):
    metrics = ServerMetrics("r1")
    ex = Exchange()
    for i, (name, vec) in enumerate([("a", _honest(1)), ("b", _honest(2)), ("c", _honest(3)),
                                     ("evil", np.full(SIZE, np.nan, np.float32))]):
        ex.replies.append(Reply(i, name, {PARAMS_KEY: vec}, dict(METRICS), vec.nbytes))
    ex.fail("d (node 9)", "d", "no-reply", "no reply within the 20s round deadline")

    accepted = _accept(ex, REFERENCE, 10.0, CAP)
    for centre, code in ex.codes.values():
        metrics.reject(centre, code)

    assert [r.centre for r in accepted] == ["a", "b", "c"]
    assert ex.failures["evil"].startswith("rejected (non-finite)")
    assert "evil did not contribute" in caplog.text

    def count(centre: str, reason: str) -> float | None:
        return metrics.registry.get_sample_value("bridgepool_rejected_updates_total",
                                                 {"run": "r1", "centre": centre, "reason": reason})

    assert count("evil", "non-finite") == 1.0 and count("d", "no-reply") == 1.0
    assert count("a", "non-finite") is None


def _outer_step(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    outer = OuterOptimizer(REFERENCE, "diloco", 0.7, 0.9)
    return aggregate(outer, states, [METRICS["tokens"]] * len(states))
