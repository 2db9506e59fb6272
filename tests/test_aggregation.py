"""Aggregation maths: pseudo-gradient sign, token weighting, the DiLoCo outer step."""

import pytest
import torch

from server.aggregation import (
    OuterOptimizer,
    aggregate,
    combine,
    mean_pseudo_gradient,
    pseudo_gradient,
    trimmed_mean,
    weighted_average,
)


def test_pseudo_gradient_is_old_minus_new():
    old = {"w": torch.tensor([1.0, 2.0])}
    new = {"w": torch.tensor([0.5, 3.0])}
    # A centre that moved w[0] down must produce a positive pseudo-gradient there,
    # so that an SGD step (p -= lr * g) moves the global model the same way.
    assert torch.equal(pseudo_gradient(old, new)["w"], torch.tensor([0.5, -1.0]))


def test_weighted_average_uses_token_weights():
    a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}
    out = weighted_average([a, b], [3.0, 1.0])
    assert out["w"].item() == pytest.approx(1.0)  # (3*0 + 1*4) / 4


def test_folded_mean_is_bit_equal_to_the_mean_of_pseudo_gradients():
    g = torch.Generator().manual_seed(0)
    ref = {"w": torch.randn(1000, generator=g), "b": torch.randn(7, generator=g)}
    locals_ = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in ref.items()} for _ in range(3)]
    weights = [640.0, 64.0, 1e5]
    folded = mean_pseudo_gradient(ref, locals_, weights)
    listed = weighted_average([pseudo_gradient(ref, s) for s in locals_], weights)
    assert all(torch.equal(folded[k], listed[k]) for k in ref)
    with pytest.raises(ValueError, match="sum to > 0"):
        mean_pseudo_gradient(ref, locals_, [0.0, 0.0, 0.0])


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.zeros(1)}], [0.0])
    with pytest.raises(ValueError):
        weighted_average([], [])


def test_outer_step_matches_hand_computed_nesterov():
    lr, mu = 0.7, 0.9
    p0 = torch.tensor([1.0, -2.0])
    g1, g2 = torch.tensor([0.1, -0.3]), torch.tensor([0.2, 0.05])
    outer = OuterOptimizer({"w": p0}, "diloco", lr, mu)
    # Nesterov SGD (PyTorch convention): buf = mu*buf + g; p -= lr*(g + mu*buf)
    buf1 = g1
    p1 = p0 - lr * (g1 + mu * buf1)
    assert torch.allclose(outer.step({"w": g1})["w"], p1)
    buf2 = mu * buf1 + g2
    p2 = p1 - lr * (g2 + mu * buf2)
    assert torch.allclose(outer.step({"w": g2})["w"], p2)
    assert torch.allclose(outer.optimizer_state()["w"], buf2)


def test_diloco_with_zero_momentum_is_plain_sgd_and_fedavg_at_lr_one():
    """outer-momentum = 0 is valid (issue 18): plain outer SGD, no Nesterov (torch refuses it without momentum)."""
    p0, g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([0.1, -0.3]), torch.tensor([0.2, 0.05])
    outer = OuterOptimizer({"w": p0}, "diloco", lr=0.5, momentum=0.0)
    assert torch.allclose(outer.step({"w": g1})["w"], p0 - 0.5 * g1)
    assert torch.allclose(outer.step({"w": g2})["w"], p0 - 0.5 * g1 - 0.5 * g2)  # no momentum carried
    glob = {"w": torch.tensor([1.0, 1.0])}
    locals_ = [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([0.0, 5.0])}]
    new = aggregate(OuterOptimizer(glob, "diloco", lr=1.0, momentum=0.0), locals_, tokens=[1.0, 3.0])
    assert torch.allclose(new["w"], torch.tensor([0.75, 4.0]))  # == FedAvg's weighted mean


def test_fedavg_is_weighted_mean_of_models():
    glob = {"w": torch.tensor([1.0, 1.0])}
    outer = OuterOptimizer(glob, "fedavg", lr=0.7, momentum=0.9)  # lr/momentum ignored by fedavg
    locals_ = [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([0.0, 5.0])}]
    new = aggregate(outer, locals_, tokens=[1.0, 3.0])
    assert torch.allclose(new["w"], torch.tensor([0.75, 4.0]))


def test_outer_state_round_trip_restores_momentum():
    a = OuterOptimizer({"w": torch.zeros(3)}, "diloco", 0.7, 0.9)
    a.step({"w": torch.ones(3)})
    b = OuterOptimizer(a.state(), "diloco", 0.7, 0.9)
    b.load_optimizer_state(a.optimizer_state())
    g = {"w": torch.tensor([0.5, -0.5, 1.0])}
    assert torch.allclose(a.step(g)["w"], b.step(g)["w"])
    with pytest.raises(ValueError, match="unknown parameters"):
        b.load_optimizer_state({"nope": torch.zeros(1)})


def test_trimmed_mean_and_median_ignore_one_wild_centre_at_four():
    honest = [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([2.0, -2.0])}, {"w": torch.tensor([3.0, -3.0])}]
    wild = {"w": torch.tensor([1e5, 1e5])}
    grads = [*honest, wild]
    # n = 4: trim 1 from each end of every coordinate -> mean of the middle two.
    assert torch.equal(combine(grads, [1.0] * 4, "trimmed-mean")["w"], torch.tensor([2.5, -1.5]))
    assert torch.equal(combine(grads, [1.0] * 4, "median")["w"], torch.tensor([2.5, -1.5]))
    assert torch.equal(combine(honest, [1.0] * 3, "median")["w"], torch.tensor([2.0, -2.0]))
    # The mean is dragged away by the same centre.
    assert combine(grads, [1.0] * 4, "mean")["w"][0] > 1e4


def test_trimmed_mean_trims_a_fifth_and_falls_back_below_three():
    grads = [{"w": torch.tensor([float(v)])} for v in (0, 1, 2, 3, 4, 5, 6, 7, 8, 100)]
    assert combine(grads, [1.0] * 10, "trimmed-mean")["w"].item() == pytest.approx(4.5)  # drops 0, 1, 8, 100
    two = grads[:2]
    assert torch.equal(combine(two, [3.0, 1.0], "median")["w"], weighted_average(two, [3.0, 1.0])["w"])
    with pytest.raises(ValueError, match="unknown aggregator"):
        combine(grads, [1.0] * 10, "mode")
    with pytest.raises(ValueError, match="cannot trim"):
        trimmed_mean(grads[:2], 1)


def test_robust_aggregate_steps_the_outer_optimiser_per_coordinate():
    glob = {"w": torch.tensor([0.0, 0.0])}
    outer = OuterOptimizer(glob, "fedavg", lr=1.0, momentum=0.0)
    locals_ = [{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 1e6)]
    new = aggregate(outer, locals_, tokens=[1.0] * 4, method="median")
    assert torch.equal(new["w"], torch.tensor([2.5, -2.5]))  # fedavg: theta = median of the models


def test_the_in_place_outer_step_is_torchs_nesterov_bit_for_bit():
    """OuterOptimizer.apply(consume=True) forms the look-ahead in the pseudo-gradient's own memory
    (the coordinator's peak memory): the same bits as torch's SGD, step after step."""
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(32, generator=gen)}
    a = OuterOptimizer(start, "diloco", 0.7, 0.9)
    b = OuterOptimizer(start, "diloco", 0.7, 0.9)
    for _ in range(3):
        g = {k: torch.randn(v.shape, generator=gen) for k, v in start.items()}
        a.apply({k: v.clone() for k, v in g.items()})
        b.apply({k: v.clone() for k, v in g.items()}, consume=True)
        for k in start:
            assert torch.equal(a.params[k], b.params[k])
            assert torch.equal(a.optimizer_state()[k], b.optimizer_state()[k])
