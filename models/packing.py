"""Model weights on the wire: one flat fp32 vector in state_dict order.

Flower stores and transfers every array of a message as a separate object, and
each object costs the SuperLink an HTTP request and database queries per node.
A state dict of ~50 tensors made the SuperLink the busiest process of a round;
one flat vector (chunked by Flower past 5 MiB) cuts that to a handful. Both
sides know the layout from the model name, so nothing but numbers is sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

PARAMS_KEY = "params"  # the only array name a model message carries


class PackingError(ValueError):
    """A flat vector does not match the model's layout."""


def pack(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Concatenate every tensor (state_dict order) into one contiguous float32 vector."""
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in state.values()]).numpy()


def unpack(vector: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split `vector` back into tensors shaped like `like` (fp32, CPU)."""
    if vector.dtype != np.float32:
        raise PackingError(f"{PARAMS_KEY} has dtype {vector.dtype}, expected float32")
    if vector.ndim != 1:
        raise PackingError(f"{PARAMS_KEY} has shape {vector.shape}, expected a flat vector")
    expected = sum(t.numel() for t in like.values())
    if vector.size != expected:
        raise PackingError(f"{PARAMS_KEY} has {vector.size} values, the model has {expected}")
    flat = torch.from_numpy(np.array(vector, copy=True))
    out, offset = {}, 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = flat[offset:offset + n].view(ref.shape)
        offset += n
    return out


def num_values(like: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in like.values())
