"""A centre's model sharded over its ranks (`centre serve --nproc N --shard`): torch's FSDP2.

    bridgepool centre serve --nproc 2 --shard --centre fr-genci --data-dir D --state-dir S --socket S/worker.sock

`fully_shard` (torch.distributed.fsdp, FSDP2) splits every parameter along its first dimension over
the centre's ranks: each transformer block is one unit (its weights are all-gathered just before its
forward and backward, and freed after), the root unit holds the rest (the embeddings, tied to the
lm_head, and the final LayerNorm). Gradients are reduce-scattered (averaged), so each rank steps
AdamW on its own shard: a rank holds 1/N of the weights, gradients and AdamW moments between
steps, plus one block's full weights at a time. The maths is DDP's (tests/test_ranks.py checks
it against 1 rank of the whole batch).

What the outside sees is unchanged: rank 0 receives the full global model and replies with the
full new one. `load_full` scatters rank 0's full state into the shards (torch's
`set_model_state_dict(..., broadcast_from_rank0=True)`: the other ranks pass nothing); `full_state`
gathers the shards into one full CPU copy on rank 0 (`get_model_state_dict(..., full_state_dict=True,
cpu_offload=True)`: the other ranks get an empty dict). Both are collectives: every rank calls them.

The inner AdamW state stays sharded on the centre's disk: each rank saves the local part of its
moments (`optim_local`, plain tensors, `rank{k}-inner-optim-round-R.pt`) and reads it back onto its
shards (`optim_sharded`), bit for bit. The ranks must be the same number on resume.

Each rank still builds the whole model in host memory before sharding it (clients/training.py
builds it once for all modes): a model larger than one host's memory would need building on the
meta device first, which this does not do yet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from models.gpt import GPT


def shard(model: GPT, device_type: str, world: int) -> GPT:
    """`model`, its parameters now this rank's shards over the centre's `world` ranks (in place: the
    same object, FSDP's subclass). The mesh is on the trainer's device type: FSDP's default is CUDA
    whenever a GPU is visible, even for a centre told to train on the CPU."""
    mesh = init_device_mesh(device_type, (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings (tied to the lm_head), final LayerNorm
    return model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights on rank 0's CPU (one full copy, there only); {} on the others."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.float() for k, v in state.items()}


def load_full(model: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Rank 0's full `state` into every rank's shards; the others pass None. torch replaces the
    entries of the dict it is given (not the tensors), so it gets a shallow copy."""
    set_model_state_dict(model, dict(state) if state is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def optim_local(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser's state_dict with this rank's local shard in place of each DTensor (torch.save
    and `weights_only` loading take plain tensors)."""
    return {**state, "state": {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def optim_sharded(state: dict[str, Any], optim: torch.optim.Optimizer) -> dict[str, Any]:
    """`optim_local`'s output turned back into DTensors laid out as `optim`'s parameters (the same
    mesh and placements: the ranks must be as many as when it was saved)."""
    params = [p for group in optim.param_groups for p in group["params"]]  # the state_dict's indices
    out: dict[int, dict[str, Any]] = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        if not isinstance(p, DTensor):
            out[i] = s
            continue
        out[i] = {k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
                  if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
    return {**state, "state": out}
