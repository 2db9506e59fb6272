"""A round's screening and aggregation over spooled updates, a chunk of the model at a time.

The same checks as server/validation.py's `screen` and the same sums as server/aggregation.py's
`round_update`, element for element and in the same order (centre-name order), so the result is
bit-equal to aggregating the updates in memory (tests/test_dataplane.py), but the coordinator holds
one chunk per centre, not one model per centre (server/spool.py).

The default mean reads each update once: it is checked and folded into the sum in the same pass,
with the weights the replies claim (already checked against the token cap). If a check then
refuses an update (non-finite, too large, a norm outlier: rare, and an attack or a bug), the sum is
started again without it: a second read. DP clipping and the robust aggregators need each update's
norm, or every update's value at a coordinate, before they can sum: they always read twice, and
per chunk hold n chunks (trimmed mean and median sort them).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from server.spool import SpooledUpdate
from server.validation import MAX_ABS_VALUE, UpdateRejected, check_metrics, norm_outliers

CHUNK_VALUES = 1 << 20  # 4 MiB of fp32 per centre in memory at a time; a multiple of the int8 block


@dataclass
class Layout:
    """Where each parameter lies in the flat vector: names the tensor a bad value is in."""

    names: list[str]
    starts: list[int]

    @classmethod
    def of(cls, reference: Mapping[str, torch.Tensor]) -> Layout:
        names, starts, pos = [], [], 0
        for k, t in reference.items():  # models/packing.py's pack order
            names.append(k)
            starts.append(pos)
            pos += t.numel()
        return cls(names, starts)

    def name_at(self, index: int) -> str:
        return self.names[max(0, bisect.bisect_right(self.starts, index) - 1)]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Element-wise work on 4 MiB chunks gains nothing from torch's thread pool and, on a machine
    the centres keep busy, loses much to it: the pool's threads spin while they wait for a core
    (measured here: 2.2 s for two `base` updates on one thread, 10-15 s on two). Element-wise
    results do not depend on the thread count, so the sums stay bit-equal."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunks(size: int) -> range:
    return range(0, size, CHUNK_VALUES)


def _check_values(x: torch.Tensor, start: int, layout: Layout) -> None:
    """validate_update's value checks on one chunk of new weights (one pass: aminmax)."""
    if not x.numel():
        return
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int(torch.nonzero(~torch.isfinite(x))[0]) + start
        raise UpdateRejected(f"{layout.name_at(bad)} contains NaN or Inf", "non-finite")
    if max(-lo, hi) > MAX_ABS_VALUE:
        bad = int(torch.nonzero(x.abs() > MAX_ABS_VALUE)[0]) + start
        raise UpdateRejected(f"{layout.name_at(bad)} has values above {MAX_ABS_VALUE:g}", "too-large")


def screen_and_mean(
    updates: Sequence[tuple[object, Mapping[str, float]]],
    reference: np.ndarray,
    layout: Layout,
    max_norm_factor: float,
    max_tokens: float,
    fold: bool = True,
    into: np.ndarray | None = None,
) -> tuple[dict[int, float], dict[int, UpdateRejected], np.ndarray | None]:
    """Screen a round's replies (spooled update, metrics) and, with `fold`, sum the token-weighted
    mean pseudo-gradient of those that pass, in one read of each update.

    Returns (index -> its pseudo-gradient's norm, for the accepted; index -> why refused; the mean
    pseudo-gradient, flat fp32, or None when `fold` is off, nothing passed or one was refused after
    it had been folded: then `weighted_mean` sums again). `updates` must be in centre-name order.
    `into`: a vector to sum in (`zeroed`), the last round's, so its pages are mapped already."""
    rejected: dict[int, UpdateRejected] = {}
    live: list[int] = []
    for i, (update, metrics) in enumerate(updates):
        try:
            check_metrics(metrics, max_tokens)  # before reading: a lying reply costs no read
            if not isinstance(update, SpooledUpdate):
                raise UpdateRejected("reply carries no update on the data plane", "keys")
        except UpdateRejected as err:
            rejected[i] = err
            continue
        live.append(i)
    total = float(sum(float(updates[i][1]["tokens"]) for i in live))
    out = zeroed(into, reference.size) if fold and live else None
    sq = dict.fromkeys(live, 0.0)
    diff = torch.empty(CHUNK_VALUES)  # one pseudo-gradient chunk at a time
    raw = np.empty(CHUNK_VALUES, np.float32)  # and one update's chunk, read into the same pages each time
    with _one_thread():
        for s in _chunks(reference.size):
            e = min(reference.size, s + CHUNK_VALUES)
            ref, d = torch.from_numpy(reference[s:e]), diff[:e - s]
            acc = torch.from_numpy(out[s:e]) if out is not None else None
            for i in live:
                if i in rejected:
                    continue
                update, metrics = updates[i]
                try:
                    x = torch.from_numpy(update.weights(reference, s, e, raw))  # type: ignore[union-attr]
                    _check_values(x, s, layout)
                except UpdateRejected as err:
                    rejected[i] = err
                    continue
                torch.sub(ref, x, out=d)  # the pseudo-gradient, as mean_pseudo_gradient forms it
                sq[i] += float(torch.linalg.vector_norm(d)) ** 2
                if acc is not None:  # mean_pseudo_gradient's fold, element for element
                    acc.add_(d, alpha=float(metrics["tokens"]) / total)
    accepted = [i for i in live if i not in rejected]
    norms = [sq[i] ** 0.5 for i in accepted]
    median = float(torch.tensor(norms).median()) if norms else 0.0
    for j in norm_outliers(norms, max_norm_factor):
        rejected[accepted[j]] = UpdateRejected(
            f"pseudo-gradient norm {norms[j]:.4g} is above {max_norm_factor:g} x the round's median "
            f"{median:.4g} (max-norm-factor)", "norm-outlier")
    kept = {i: n for i, n in zip(accepted, norms, strict=True) if i not in rejected}
    if out is not None and len(kept) != len(live):
        out = None  # a refused update was folded in: the caller sums the kept ones again
    return kept, rejected, out


def zeroed(into: np.ndarray | None, size: int) -> np.ndarray:
    """`into` filled with zeros when it is a writable fp32 vector of `size` values, else a new one.
    A new 0.5 GB vector is mapped page by page as the sum first touches it: ~0.5 s of page faults
    on a 2-core machine, each round; zeroing pages already mapped takes ~0.05 s."""
    if into is None or into.dtype != np.float32 or into.shape != (size,) or not into.flags.writeable:
        return np.zeros(size, np.float32)
    into.fill(0.0)
    return into


def weighted_mean(updates: Sequence[SpooledUpdate], weights: Sequence[float], reference: np.ndarray,
                  into: np.ndarray | None = None) -> np.ndarray:
    """server/aggregation.py's mean_pseudo_gradient over spooled updates (bit for bit)."""
    total = float(sum(weights))
    out = zeroed(into, reference.size)
    raw, diff = np.empty(CHUNK_VALUES, np.float32), torch.empty(CHUNK_VALUES)  # reused: see screen_and_mean
    with _one_thread():
        for s in _chunks(reference.size):
            e = min(reference.size, s + CHUNK_VALUES)
            ref, acc, d = torch.from_numpy(reference[s:e]), torch.from_numpy(out[s:e]), diff[:e - s]
            for u, w in zip(updates, weights, strict=True):
                torch.sub(ref, torch.from_numpy(u.weights(reference, s, e, raw)), out=d)
                acc.add_(d, alpha=float(w) / total)
    return out


def combined(updates: Sequence[SpooledUpdate], tokens: Sequence[float], norms: Sequence[float],
             reference: np.ndarray, method: str, dp_clip: float, dp_noise_multiplier: float,
             generator: torch.Generator | None = None, into: np.ndarray | None = None) -> np.ndarray:
    """server/aggregation.py's `round_update` (before the outer step) over spooled updates: the
    mean, DP's clipped mean plus noise, or a robust aggregator, chunk by chunk. `norms`: each
    update's pseudo-gradient norm (from `screen_and_mean`), which DP's clipping needs up front."""
    if dp_clip == 0 and (method == "mean" or len(updates) < 3):
        return weighted_mean(updates, tokens, reference, into)
    n = len(updates)
    if dp_clip > 0:  # private_mean: unweighted mean of clipped updates, N(0, (z C / n)^2) per coordinate
        scales = [dp_clip / norm if norm > dp_clip else 1.0 for norm in norms]
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
    elif method == "trimmed-mean":
        trim = max(1, n // 5)
    elif method == "median":
        trim = (n - 1) // 2
    else:
        raise ValueError(f"unknown aggregator {method!r}; choose mean, trimmed-mean or median")
    out = zeroed(into, reference.size)
    raw = np.empty(CHUNK_VALUES, np.float32)  # each update's chunk is read here, then copied out by `ref -`
    with _one_thread():
        for s in _chunks(reference.size):
            e = min(reference.size, s + CHUNK_VALUES)
            ref, acc = torch.from_numpy(reference[s:e]), torch.from_numpy(out[s:e])
            grads = [ref - torch.from_numpy(u.weights(reference, s, e, raw)) for u in updates]
            if dp_clip > 0:
                for g, scale in zip(grads, scales, strict=True):
                    acc.add_(g * scale, alpha=1.0 / n)
                if dp_noise_multiplier > 0:
                    acc.add_(torch.randn(e - s, generator=generator, dtype=torch.float32),
                             alpha=dp_noise_multiplier * dp_clip / n)
            else:
                acc.copy_(torch.stack(grads).sort(dim=0).values[trim:n - trim].mean(dim=0))
    return out
