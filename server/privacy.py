"""Privacy accounting for the DP option (server/aggregation.py `private_mean`). Pure Python.

Every round is one Gaussian mechanism on the sum of clipped centre updates:
sensitivity C (one centre's whole update, added or removed), noise std z*C, so
noise multiplier z. Every centre takes part every round (no subsampling), so its
Renyi DP at order a after T rounds is T * a / (2 z^2) (Mironov 2017, Prop. 7 and
composition). Converted to (epsilon, delta)-DP with Balle et al. 2020, Thm. 21,
minimised over the same grid of orders Opacus' RDPAccountant uses, so the
numbers can be checked against it (tests/test_privacy.py).

What epsilon covers: what the published global models (and so every centre and
anyone holding a checkpoint) can learn about one centre's data. It does not cover
the coordinator, which receives each centre's update before noise is added.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def gaussian_rdp(noise_multiplier: float, rounds: int, order: float) -> float:
    """Renyi DP of `rounds` compositions of the Gaussian mechanism at `order`."""
    if noise_multiplier <= 0:
        return math.inf
    return rounds * order / (2.0 * noise_multiplier ** 2)


def epsilon(noise_multiplier: float, rounds: int, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """The smallest epsilon over `orders` such that `rounds` rounds are (epsilon, delta)-DP.

    math.inf when there is no noise (clipping alone bounds nothing); 0 before any round.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    best = math.inf
    for a in orders:
        if a <= 1:
            continue
        eps = (gaussian_rdp(noise_multiplier, rounds, a) - (math.log(delta) + math.log(a)) / (a - 1)
               + math.log((a - 1) / a))
        best = min(best, eps)
    return max(0.0, best)


def round_record(clip: float, noise_multiplier: float, delta: float, rounds_so_far: int,
                 centres: int) -> dict[str, float | int | None]:
    """The `dp` entry of a run.json round: settings and the epsilon spent so far (None = unbounded)."""
    eps = epsilon(noise_multiplier, rounds_so_far, delta)
    return {"clip": clip, "noise-multiplier": noise_multiplier, "delta": delta, "rounds": rounds_so_far,
            "noise-std": noise_multiplier * clip / centres if centres else None,
            "epsilon": None if math.isinf(eps) else eps}
