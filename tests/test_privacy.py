"""The DP option: clipping, noise scale, and the RDP accountant (server/aggregation.py, server/privacy.py)."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ConfigError, RunConfig, load_defaults
from server.aggregation import OuterOptimizer, aggregate, clip_to_norm, global_norm, private_mean
from server.privacy import epsilon, round_record


def _update(scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(40, 30, generator=g) * scale, "b": torch.randn(77, generator=g) * scale}


def test_clipping_bounds_the_norm_and_keeps_direction():
    big, small = _update(10.0, 0), _update(1e-3, 1)
    clipped = clip_to_norm(big, 2.5)
    assert global_norm(big) > 2.5
    assert global_norm(clipped) == pytest.approx(2.5, rel=1e-5)
    ratio = clipped["a"] / big["a"]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))  # one scale for every coordinate
    assert torch.equal(clip_to_norm(small, 2.5)["b"], small["b"])  # short updates are untouched


def test_private_mean_without_noise_is_mean_of_clipped():
    grads = [_update(10.0, 2), _update(0.01, 3)]
    got = private_mean(grads, clip=1.0, noise_multiplier=0.0)
    c0, c1 = clip_to_norm(grads[0], 1.0), clip_to_norm(grads[1], 1.0)
    for k in got:
        assert torch.allclose(got[k], (c0[k] + c1[k]) / 2, atol=1e-6)
    assert global_norm(got) <= 1.0 + 1e-5  # one centre cannot move the average by more than C


def test_noise_has_std_z_times_clip_over_centres():
    zeros = [{"w": torch.zeros(200_000)} for _ in range(4)]
    out = private_mean(zeros, clip=0.5, noise_multiplier=1.2, generator=torch.Generator().manual_seed(7))
    assert out["w"].std().item() == pytest.approx(1.2 * 0.5 / 4, rel=0.02)
    assert abs(out["w"].mean().item()) < 0.005
    # Default: fresh OS entropy each call, never a reproducible (subtractable) seed.
    a, b = private_mean(zeros, 0.5, 1.2), private_mean(zeros, 0.5, 1.2)
    assert not torch.equal(a["w"], b["w"])


def test_aggregate_with_dp_clips_before_outer_step():
    state = {"w": torch.zeros(10)}
    outer = OuterOptimizer(state, "fedavg", 1.0, 0.0)
    far = {"w": torch.full((10,), 100.0)}  # pseudo-gradient norm ~316
    new = aggregate(outer, [far], [1.0], dp_clip=1.0)
    assert global_norm(new) == pytest.approx(1.0, rel=1e-5)  # fedavg: the step is the clipped update


def test_epsilon_matches_opacus_for_one_case():
    # opacus 1.6.0: RDPAccountant analysis compute_rdp(q=1, noise_multiplier=1.0, steps=10,
    # orders=DEFAULT_ALPHAS) then get_privacy_spent(delta=1e-5) -> (19.05359753163139, 2.5)
    assert epsilon(1.0, 10, 1e-5) == pytest.approx(19.05359753163139, rel=1e-9)
    assert epsilon(2.0, 10, 1e-5) == pytest.approx(8.079406222420491, rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [epsilon(1.5, t, 1e-5) for t in (1, 2, 5, 20)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [epsilon(z, 10, 1e-5) for z in (0.8, 1.5, 3.0, 10.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert epsilon(1.0, 10, 1e-3) < epsilon(1.0, 10, 1e-6)  # a looser delta buys a smaller epsilon
    assert epsilon(0.0, 3, 1e-5) == math.inf and epsilon(1.0, 0, 1e-5) == 0.0


def test_round_record_reports_unbounded_epsilon_as_none():
    assert round_record(1.0, 0.0, 1e-5, 3, 2)["epsilon"] is None  # clipping alone bounds nothing
    rec = round_record(1.0, 2.0, 1e-5, 10, 4)
    assert rec["epsilon"] == pytest.approx(8.079406222420491) and rec["noise-std"] == 0.5


def test_config_validates_dp_keys():
    base = load_defaults()
    assert RunConfig.from_mapping(base).dp_clip == 0.0  # off by default
    for bad in ({"dp-clip": -1.0}, {"dp-delta": 0.0}, {"dp-delta": 1.0},
                {"dp-noise-multiplier": 1.0},  # noise without a clip norm
                {"dp-clip": 1.0, "aggregator": "median"}):
        with pytest.raises(ConfigError, match="dp-"):
            RunConfig.from_mapping({**base, **bad})
    RunConfig.from_mapping({**base, "dp-clip": 1.0, "dp-noise-multiplier": 1.1})
