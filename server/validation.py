"""Checks every centre's reply before it can touch the global model (pure torch).

Flower does not validate reply shapes, dtypes or values: a single NaN update
would poison the average. A rejected update is logged with the centre and the
reason, and simply left out of the round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from models.packing import PARAMS_KEY, PackingError, unpack

MAX_ABS_VALUE = 1e6  # weights of a sane model are O(1); 1e30 "updates" are attacks or bugs


class UpdateRejected(ValueError):
    """An update failed validation; the message says which check and which tensor."""


def decode_update(arrays: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reply's arrays as a state dict shaped like `reference`, or UpdateRejected."""
    if set(arrays) != {PARAMS_KEY}:
        raise UpdateRejected(f"reply carries arrays {sorted(arrays)[:5]}; expected only '{PARAMS_KEY}'")
    try:
        return unpack(np.asarray(arrays[PARAMS_KEY]), reference)
    except PackingError as err:
        raise UpdateRejected(str(err)) from err


def validate_update(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    metrics: Mapping[str, float],
) -> None:
    """Raise UpdateRejected unless `update` has exactly the reference's keys, shapes,
    dtypes and finite, bounded values, and the metrics are finite with tokens > 0."""
    missing, extra = set(reference) - set(update), set(update) - set(reference)
    if missing:
        raise UpdateRejected(f"missing tensors: {sorted(missing)[:3]}")
    if extra:
        raise UpdateRejected(f"unexpected tensors: {sorted(extra)[:3]}")
    for name, ref in reference.items():
        t = update[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise UpdateRejected(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise UpdateRejected(f"{name} has dtype {t.dtype}, expected {ref.dtype}")
        if not torch.isfinite(t).all():
            raise UpdateRejected(f"{name} contains NaN or Inf")
        if t.abs().max() > MAX_ABS_VALUE:
            raise UpdateRejected(f"{name} has values above {MAX_ABS_VALUE:g}")
    for key, value in metrics.items():
        if not torch.isfinite(torch.tensor(float(value))):
            raise UpdateRejected(f"metric {key} is not finite")
    if not metrics.get("tokens", 0) > 0:
        raise UpdateRejected("metric 'tokens' must be > 0 (it weights the average)")


def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (reference - update), the size of a centre's pseudo-gradient."""
    sq = sum(float((reference[k].float() - update[k].float()).pow(2).sum()) for k in reference)
    return sq ** 0.5


def norm_outliers(norms: Sequence[float], factor: float) -> list[int]:
    """Indices whose norm exceeds `factor` x the median norm of the round."""
    if len(norms) < 3 or factor <= 0:
        return []  # a median of one or two says nothing
    median = float(torch.tensor(list(norms)).median())
    return [i for i, n in enumerate(norms) if median > 0 and n > factor * median]
