"""Model weights on the wire: one flat fp32 vector, tensors in sorted-name order.

Flower stores and transfers every array of a message as a separate object, and
each object costs the SuperLink an HTTP request and database queries per node.
A state dict of ~50 tensors made the SuperLink the busiest process of a round;
one flat vector (chunked by Flower past 5 MiB) cuts that to a handful. Both
sides know the layout from the model name, so nothing but numbers is sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

PARAMS_KEY = "params"  # the only array name a model message carries


class PackingError(ValueError):
    """A flat vector does not match the model's layout."""


def pack(state: Mapping[str, torch.Tensor], out: np.ndarray | None = None) -> np.ndarray:
    """Concatenate every tensor, in sorted-name order, into one contiguous float32 vector: a new
    one, or `out` (a float32 vector of the state's size, overwritten and returned). Reusing a
    vector matters at size: a fresh 0.5 GB one costs ~0.5 s of page faults on a 2-core machine.

    Sorted, not insertion order: a state dict read back from safetensors comes out
    alphabetical while model.state_dict() is in module order; both must pack alike.
    """
    parts = [state[k].detach().reshape(-1).float().cpu() for k in sorted(state)]
    if out is None:
        return torch.cat(parts).numpy()
    _check_out(out, np.float32, sum(p.numel() for p in parts))
    torch.cat(parts, out=torch.from_numpy(out))
    return out


def _check_out(out: np.ndarray, dtype: type, size: int) -> None:
    """PackingError unless `out` is a writable, contiguous vector of `size` values of `dtype`."""
    if out.dtype != dtype or out.shape != (size,) or not out.flags.c_contiguous or not out.flags.writeable:
        raise PackingError(f"output vector is {out.dtype} {out.shape}, expected a writable "
                           f"{np.dtype(dtype).name} ({size},)")


def unpack(vector: np.ndarray, like: Mapping[str, torch.Tensor], copy: bool = True) -> dict[str, torch.Tensor]:
    """Split `vector` back into tensors shaped like `like` (fp32, CPU): views of one copy of it, or
    (`copy=False`, for a buffer the caller owns and will not change) views of `vector` itself."""
    if vector.dtype != np.float32:
        raise PackingError(f"{PARAMS_KEY} has dtype {vector.dtype}, expected float32")
    if vector.ndim != 1:
        raise PackingError(f"{PARAMS_KEY} has shape {vector.shape}, expected a flat vector")
    expected = sum(t.numel() for t in like.values())
    if vector.size != expected:
        raise PackingError(f"{PARAMS_KEY} has {vector.size} values, the model has {expected}")
    flat = torch.from_numpy(np.array(vector, copy=True) if copy else vector)
    out, offset = {}, 0
    for name in sorted(like):
        ref = like[name]
        n = ref.numel()
        out[name] = flat[offset:offset + n].view(ref.shape)
        offset += n
    return out


# bf16 on the wire (config `wire-dtype`, data plane only): the new weights rounded to bfloat16, half
# the bytes of fp32, as raw 16-bit patterns (numpy has no bf16; models/blob.py names them "bfloat16").
BF16_KEY = "params-bf16"


def to_bf16_bits(vector: np.ndarray) -> np.ndarray:
    """fp32 vector -> its bf16 rounding (round to nearest even), as uint16 bit patterns."""
    return torch.from_numpy(np.ascontiguousarray(vector, np.float32)).to(torch.bfloat16).view(torch.int16).numpy() \
        .view(np.uint16)


def pack_bf16_bits(state: Mapping[str, torch.Tensor], out: np.ndarray) -> np.ndarray:
    """`to_bf16_bits(pack(state))` without the fp32 vector: each tensor rounded to bf16 (the same
    round to nearest even, value by value, so the same bits) into `out` (uint16, reused)."""
    parts = [state[k].detach().reshape(-1).cpu().to(torch.bfloat16) for k in sorted(state)]
    _check_out(out, np.uint16, sum(p.numel() for p in parts))
    torch.cat(parts, out=torch.from_numpy(out.view(np.int16)).view(torch.bfloat16))
    return out


def from_bf16_bits(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 bf16 bit patterns -> fp32 (exact: every bf16 value is an fp32 value), into `out`
    (fp32, as many values) when given."""
    if bits.dtype != np.uint16 or bits.ndim != 1:
        raise PackingError(f"{BF16_KEY} must be a flat vector of bf16 bit patterns, got {bits.dtype} {bits.shape}")
    wide = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)
    if out is None:
        return wide.float().numpy()
    torch.from_numpy(out).copy_(wide)
    return out


def num_values(like: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in like.values())


# ------------------------------------------------------------------ int8
# Pseudo-gradients (old - new) quantised per block of values with one fp32 scale
# each (symmetric, round to nearest), as INTELLECT-1 does with uint8: 1 byte per
# value plus 4 bytes per block, i.e. 0.254 x fp32 at 1024-value blocks. The
# server dequantises and accumulates in fp32. The broadcast uses the same format
# for the change of the global model (see "broadcast" below).
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



# -------------------------------------------------------------- broadcast
# What a server->centre message carries (config key FORM_KEY; server/broadcast.py
# chooses, clients/broadcast.py applies): FULL, the flat fp32 model; DELTA, the int8
# change from the base the centre holds (BASE_SHA_KEY) to the new one; SEED, no
# weights at all: the new model is the run's initial one, built from the seed.
# NEW_SHA_KEY is the SHA-256 of the model the centre must end up with. A centre
# that cannot produce it replies only the metric STALE_BASE_METRIC = 1.
FORM_KEY, BASE_SHA_KEY, NEW_SHA_KEY = "form", "base-sha256", "new-sha256"
FULL, DELTA, SEED = "full", "delta", "seed"
STALE_BASE_METRIC = "stale-base"


def vector_sha256(vector: np.ndarray) -> str:
    """SHA-256 of a flat fp32 vector's bytes (the label both sides compare)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(vector, dtype=np.float32)).cast("B")).hexdigest()


def apply_int8_delta(base: np.ndarray, delta: Mapping[str, np.ndarray]) -> np.ndarray:
    """base + dequantised delta: the one place the server and a centre compute the new broadcast
    model. numpy fp32 on the CPU, element-wise (IEEE rounding, no FMA, no reduction), so both
    sides get the same bits on any x86/ARM machine. Values whose int8 code is 0 keep base's
    exact bits (b + 0.0 would turn -0.0 into +0.0), so a zero delta leaves base unchanged."""
    base = np.asarray(base)
    if base.dtype != np.float32 or base.ndim != 1:
        raise PackingError(f"base must be a flat float32 vector, got {base.dtype} {base.shape}")
    out = base + dequantize_int8({k: np.asarray(v) for k, v in delta.items()}, base.size)
    np.copyto(out, base, where=np.asarray(delta[INT8_KEY]) == 0)
    return out


def int8_broadcast_step(master: np.ndarray, base: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(q, b_new): q = int8(master - base), b_new = apply_int8_delta(base, q). What q leaves out,
    master - b_new, stays in the server's master - base and is sent next time (error feedback)."""
    q = quantize_int8(np.asarray(master, np.float32) - base)
    return q, apply_int8_delta(base, q)
