"""Model weights on the wire: one flat fp32 vector, tensors in sorted-name order.

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
    """Concatenate every tensor, in sorted-name order, into one contiguous float32 vector.

    Sorted, not insertion order: a state dict read back from safetensors comes out
    alphabetical while model.state_dict() is in module order; both must pack alike.
    """
    return torch.cat([state[k].detach().reshape(-1).float().cpu() for k in sorted(state)]).numpy()


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
    for name in sorted(like):
        ref = like[name]
        n = ref.numel()
        out[name] = flat[offset:offset + n].view(ref.shape)
        offset += n
    return out


def num_values(like: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in like.values())


# ------------------------------------------------------------------ int8
# Pseudo-gradients (old - new) quantised per block of values with one fp32 scale
# each (symmetric, round to nearest), as INTELLECT-1 does with uint8: 1 byte per
# value plus 4 bytes per block, i.e. 0.254 x fp32 at 1024-value blocks. The
# server dequantises and accumulates in fp32.
INT8_KEY, SCALE_KEY = "delta-int8", "delta-scale"
INT8_BLOCK = 1024


def quantize_int8(delta: np.ndarray, block: int = INT8_BLOCK) -> dict[str, np.ndarray]:
    n = delta.size
    pad = (-n) % block
    blocks = np.concatenate([delta.astype(np.float32), np.zeros(pad, np.float32)]).reshape(-1, block)
    scale = np.abs(blocks).max(axis=1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
    return {INT8_KEY: q, SCALE_KEY: scale.astype(np.float32)}


def dequantize_int8(arrays: dict[str, np.ndarray], size: int, block: int = INT8_BLOCK) -> np.ndarray:
    q, scale = arrays[INT8_KEY], arrays[SCALE_KEY]
    if q.dtype != np.int8 or q.ndim != 1 or q.size != size:
        raise PackingError(f"{INT8_KEY} must be a flat int8 vector of {size} values, got {q.dtype} {q.shape}")
    blocks = -(-size // block)
    if scale.dtype != np.float32 or scale.shape != (blocks,):
        raise PackingError(f"{SCALE_KEY} must be {blocks} float32 scales, got {scale.dtype} {scale.shape}")
    if not np.isfinite(scale).all():
        raise PackingError(f"{SCALE_KEY} contains NaN or Inf")
    pad = np.zeros((-size) % block, np.int8)
    return (np.concatenate([q, pad]).reshape(blocks, block).astype(np.float32) * scale[:, None]).reshape(-1)[:size]
