"""Aggregation maths: token-weighted averaging and the DiLoCo outer step.

Pure torch, no Flower. The server keeps the global model as an fp32 CPU copy;
every centre's reply is a full state dict of the model it trained locally, from
the model it was sent (equal to the global one unless the broadcast is int8:
server/broadcast.py).

DiLoCo (Douillard et al. 2023): pseudo-gradient g_i = theta_global - theta_i,
averaged with token weights, then applied by a real
`torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`. FedAvg is the same
average applied with lr=1 and no momentum, i.e. the weighted mean of the models.

Robust alternatives to the mean (config `aggregator`), coordinate-wise over the
pseudo-gradients and unweighted (a token count is a claim a hostile centre makes):
`trimmed-mean` drops the k largest and k smallest values of every coordinate,
k = max(1, n // 5) when n >= 3 (so at 4 centres: the mean of the middle two);
`median` takes the middle value (the mean of the middle two for even n).
With fewer than 3 updates both fall back to the token-weighted mean.

Differential privacy (config `dp-clip` > 0): each pseudo-gradient is clipped to
L2 norm C (over all tensors together), the clipped ones are averaged without
weights, and Gaussian noise of std z*C/n is added to the average (DP-FedAvg,
McMahan et al. 2018): the sum of clipped updates gets noise z*C, i.e. noise
multiplier z for one centre's whole update. server/privacy.py accounts for it.
The noise comes from OS entropy: a seed in the run config would let anyone holding
the config subtract it again.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from models.packing import pack, unpack

StateDict = dict[str, torch.Tensor]


def pseudo_gradient(global_state: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor]) -> StateDict:
    """old - new: the direction a centre moved away from, i.e. a gradient-like step."""
    return {k: global_state[k].float() - local_state[k].float() for k in global_state}


def mean_pseudo_gradient(global_state: Mapping[str, torch.Tensor], local_states: Sequence[Mapping[str, torch.Tensor]],
                         weights: Sequence[float]) -> StateDict:
    """`weighted_average` of the `pseudo_gradient`s, bit for bit, folded in one update at a time: one
    model-sized sum and one tensor-sized temporary, instead of a pseudo-gradient per centre."""
    if not local_states:
        raise ValueError("mean_pseudo_gradient needs at least one update")
    if len(local_states) != len(weights):
        raise ValueError(f"{len(local_states)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}
    for local, w in zip(local_states, weights, strict=True):
        for k in out:
            out[k].add_(global_state[k].float() - local[k].float(), alpha=float(w) / total)
    return out


def weighted_average(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """sum_i w_i x_i / sum_i w_i, accumulated in fp32 (weights = tokens trained)."""
    if not tensors:
        raise ValueError("weighted_average needs at least one update")
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in tensors[0].items()}
    for update, w in zip(tensors, weights, strict=True):
        for k in out:
            out[k].add_(update[k].float(), alpha=float(w) / total)
    return out


class OuterOptimizer:
    """Holds the global fp32 CPU parameters and applies averaged pseudo-gradients.

    `diloco`: SGD(lr, momentum, nesterov=True), or plain SGD(lr) when momentum is 0. `fedavg`: SGD(lr=1, momentum=0),
    which makes theta <- theta - mean(theta - theta_i) = mean(theta_i).
    """

    def __init__(self, state: Mapping[str, torch.Tensor], strategy: str, lr: float, momentum: float):
        if strategy not in ("diloco", "fedavg"):
            raise ValueError(f"unknown strategy {strategy!r}; choose diloco or fedavg")
        self.strategy = strategy
        # One flat fp32 vector in the wire's layout (models/packing.py: sorted names), the parameters views
        # of it: the vector is also the broadcast copy b the centres download (server/app.py `_sent`), so
        # the coordinator holds the model once, not a master copy and a packed copy of it.
        self.flat = torch.from_numpy(pack(state))
        views = unpack(self.flat.numpy(), state, copy=False)
        self.params = {k: torch.nn.Parameter(views[k]) for k in state}  # the state's order, as before
        if strategy == "diloco":
            # Nesterov needs momentum > 0 (torch refuses it otherwise); momentum 0 is plain outer SGD,
            # which with lr 1 is FedAvg.
            self.opt = torch.optim.SGD(self.params.values(), lr=lr, momentum=momentum, nesterov=momentum > 0)
        else:
            self.opt = torch.optim.SGD(self.params.values(), lr=1.0, momentum=0.0)

    def _point_at(self, flat: torch.Tensor) -> None:
        """Make the parameters views of `flat` (the optimiser's state stays keyed by the same objects)."""
        views = unpack(flat.numpy(), self.params, copy=False)
        for k, p in self.params.items():
            p.data = views[k]
        self.flat = flat

    def vector(self) -> np.ndarray:
        """The master weights as one flat fp32 vector (the parameters' storage, no copy)."""
        return self.flat.numpy()

    def relocate(self) -> None:
        """Move the master weights to a new vector, leaving the old one as it is for whoever still
        reads it (a late centre's download of the last round's model): the next step changes the copy."""
        self._point_at(self.flat.clone())

    def state(self) -> StateDict:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def weights(self) -> StateDict:
        """The master weights as they are (views, no copy): read them before the next step."""
        return {k: p.detach() for k, p in self.params.items()}

    def step(self, avg_pseudo_grad: Mapping[str, torch.Tensor]) -> StateDict:
        """Apply the round's pseudo-gradient; returns a copy of the new weights."""
        self.apply(avg_pseudo_grad)
        return self.state()

    @torch.no_grad()
    def apply(self, avg_pseudo_grad: Mapping[str, torch.Tensor], consume: bool = False) -> None:
        """One outer step. `consume`: the pseudo-gradient's tensors are the caller's to overwrite, so
        Nesterov's look-ahead (g + m * buf) is formed in them, not in a new tensor per parameter
        (the coordinator's peak stays at three model-sized vectors); the bits are torch's SGD's."""
        group = self.opt.param_groups[0]
        if consume and group["nesterov"] and not group["weight_decay"] and not group["dampening"]:
            momentum, lr = group["momentum"], group["lr"]
            for k, p in self.params.items():
                g = avg_pseudo_grad[k]
                if g.dtype != p.dtype:
                    g = g.to(p.dtype)
                state = self.opt.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:  # torch's first step: the buffer starts as the gradient
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(momentum).add_(g)
                p.add_(g.add_(buf, alpha=momentum), alpha=-lr)
            return
        for k, p in self.params.items():
            # No copy: SGD reads the gradient and never writes it (nesterov makes a new tensor).
            p.grad = avg_pseudo_grad[k].to(p.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Momentum buffers by parameter name (flat, so safetensors can store them)."""
        out: dict[str, torch.Tensor] = {}
        for k, p in self.params.items():
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[k] = buf.detach()  # read, not kept: a checkpoint writes them out (no copy of the model)
        return out

    def load_optimizer_state(self, buffers: Mapping[str, torch.Tensor]) -> None:
        unknown = set(buffers) - set(self.params)
        if unknown:
            raise ValueError(f"outer-optimiser state has unknown parameters: {sorted(unknown)[:5]}")
        for k, buf in buffers.items():
            if buf.shape != self.params[k].shape:
                raise ValueError(f"outer-optimiser buffer {k} has shape {tuple(buf.shape)}, "
                                 f"expected {tuple(self.params[k].shape)}")
            self.opt.state[self.params[k]]["momentum_buffer"] = buf.float().clone()


def trimmed_mean(tensors: Sequence[Mapping[str, torch.Tensor]], trim: int) -> StateDict:
    """Per coordinate: sort the n values, drop `trim` at each end, average the rest."""
    n = len(tensors)
    if trim < 0 or 2 * trim >= n:
        raise ValueError(f"cannot trim {trim} from each end of {n} updates")
    out = {}
    for k in tensors[0]:
        stacked = torch.stack([t[k].float() for t in tensors])  # (n, *shape)
        out[k] = stacked.sort(dim=0).values[trim:n - trim].mean(dim=0)
    return out


def coordinate_median(tensors: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Per coordinate median; for even n the mean of the two middle values."""
    n = len(tensors)
    return trimmed_mean(tensors, (n - 1) // 2)


def combine(grads: Sequence[Mapping[str, torch.Tensor]], tokens: Sequence[float], method: str) -> StateDict:
    """The round's pseudo-gradient from the accepted ones, by `method` (config `aggregator`)."""
    if method == "mean" or (method in ("trimmed-mean", "median") and len(grads) < 3):
        return weighted_average(grads, tokens)
    if method == "trimmed-mean":
        return trimmed_mean(grads, max(1, len(grads) // 5))
    if method == "median":
        return coordinate_median(grads)
    raise ValueError(f"unknown aggregator {method!r}; choose mean, trimmed-mean or median")


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of `update` taken together."""
    return float(torch.sqrt(sum((t.float().pow(2).sum() for t in update.values()), torch.tensor(0.0))))


def clip_to_norm(update: Mapping[str, torch.Tensor], max_norm: float) -> StateDict:
    """`update` scaled down to L2 norm `max_norm` if it is longer (direction kept)."""
    if not max_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {max_norm}")
    norm = global_norm(update)
    scale = max_norm / norm if norm > max_norm else 1.0
    return {k: t.float() * scale for k, t in update.items()}


def private_mean(grads: Sequence[Mapping[str, torch.Tensor]], clip: float, noise_multiplier: float,
                 generator: torch.Generator | None = None) -> StateDict:
    """Unweighted mean of the clipped updates plus N(0, (z*C/n)^2) per coordinate.

    Unweighted: with token weights one centre could claim a large share and exceed
    the sensitivity C/n the noise is calibrated to.
    """
    if not grads:
        raise ValueError("private_mean needs at least one update")
    n = len(grads)
    clipped = [clip_to_norm(g, clip) for g in grads]
    mean = weighted_average(clipped, [1.0] * n)
    if noise_multiplier > 0:
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        sigma = noise_multiplier * clip / n
        for t in mean.values():
            t.add_(torch.randn(t.shape, generator=generator, dtype=torch.float32), alpha=sigma)
    return mean


def aggregate(
    outer: OuterOptimizer,
    local_states: Sequence[Mapping[str, torch.Tensor]],
    tokens: Sequence[float],
    method: str = "mean",
    dp_clip: float = 0.0,
    dp_noise_multiplier: float = 0.0,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> StateDict:
    """One outer round: pseudo-gradients, combined by `method` (or privately when `dp_clip` > 0),
    outer step. Returns new global.

    `reference` is the model the centres trained from, i.e. what they were sent (with an
    int8 broadcast, server/broadcast.py's b_new, not the master weights); pseudo-gradients are
    taken against it and applied to the master weights. Default: the master weights (fp32)."""
    return outer.step(round_update(outer, local_states, tokens, method, dp_clip, dp_noise_multiplier, reference))


def round_update(
    outer: OuterOptimizer,
    local_states: Sequence[Mapping[str, torch.Tensor]],
    tokens: Sequence[float],
    method: str = "mean",
    dp_clip: float = 0.0,
    dp_noise_multiplier: float = 0.0,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> StateDict:
    """The round's combined pseudo-gradient, which `aggregate` applies (the ServerApp frees the
    updates first). The mean folds one update at a time; the robust aggregators and DP hold a
    pseudo-gradient per centre at once (n x the model's bytes)."""
    current = outer.weights() if reference is None else reference  # read only
    if dp_clip == 0 and (method == "mean" or len(local_states) < 3):
        return mean_pseudo_gradient(current, local_states, tokens)
    grads = [pseudo_gradient(current, s) for s in local_states]
    if dp_clip > 0:
        return private_mean(grads, dp_clip, dp_noise_multiplier)
    return combine(grads, tokens, method)
