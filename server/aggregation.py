"""Aggregation maths: token-weighted averaging and the DiLoCo outer step.

Pure torch, no Flower. The server keeps the global model as an fp32 CPU copy;
every centre's reply is a full state dict of the model it trained locally.

DiLoCo (Douillard et al. 2023): pseudo-gradient g_i = theta_global - theta_i,
averaged with token weights, then applied by a real
`torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`. FedAvg is the same
average applied with lr=1 and no momentum, i.e. the weighted mean of the models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def pseudo_gradient(global_state: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor]) -> StateDict:
    """old - new: the direction a centre moved away from, i.e. a gradient-like step."""
    return {k: global_state[k].float() - local_state[k].float() for k in global_state}


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

    `diloco`: SGD(lr, momentum, nesterov=True). `fedavg`: SGD(lr=1, momentum=0),
    which makes theta <- theta - mean(theta - theta_i) = mean(theta_i).
    """

    def __init__(self, state: Mapping[str, torch.Tensor], strategy: str, lr: float, momentum: float):
        if strategy not in ("diloco", "fedavg"):
            raise ValueError(f"unknown strategy {strategy!r}; choose diloco or fedavg")
        self.strategy = strategy
        self.params = {k: torch.nn.Parameter(v.detach().float().cpu().clone()) for k, v in state.items()}
        if strategy == "diloco":
            self.opt = torch.optim.SGD(self.params.values(), lr=lr, momentum=momentum, nesterov=True)
        else:
            self.opt = torch.optim.SGD(self.params.values(), lr=1.0, momentum=0.0)

    def state(self) -> StateDict:
        return {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def step(self, avg_pseudo_grad: Mapping[str, torch.Tensor]) -> StateDict:
        for k, p in self.params.items():
            p.grad = avg_pseudo_grad[k].to(p.dtype).clone()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.state()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Momentum buffers by parameter name (flat, so safetensors can store them)."""
        out: dict[str, torch.Tensor] = {}
        for k, p in self.params.items():
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[k] = buf.detach().clone()
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


def aggregate(
    outer: OuterOptimizer,
    local_states: Sequence[Mapping[str, torch.Tensor]],
    tokens: Sequence[float],
) -> StateDict:
    """One outer round: pseudo-gradients, token-weighted mean, outer step. Returns new global."""
    current = outer.state()
    grads = [pseudo_gradient(current, s) for s in local_states]
    return outer.step(weighted_average(grads, tokens))
