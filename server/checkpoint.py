"""Round-boundary checkpoints on disk: weights, outer-optimiser state, round, config.

Layout: RUN_DIR/checkpoints/round-0003/{model.safetensors, outer.safetensors, meta.json},
plus broadcast.safetensors with an int8 broadcast: the copy b the centres hold
(server/broadcast.py), so a resumed run sends the same deltas as an unbroken one.
A checkpoint without it (fp32 runs, older checkpoints) means b = the model.
A checkpoint is written into a temporary directory and renamed into place, so a
crash never leaves a half-written round; meta.json records each file's SHA-256,
so a corrupted or truncated file is detected on load and the previous good round
is used instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("bridgepool.checkpoint")  # under the ServerApp's logger: lands in server.log
FILES = ("model.safetensors", "outer.safetensors")
BROADCAST_FILE = "broadcast.safetensors"  # optional: {"params": flat fp32 b}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupted or does not match its manifest."""


@dataclass
class Checkpoint:
    round: int
    model: dict[str, torch.Tensor]
    outer: dict[str, torch.Tensor]
    config: dict[str, Any]
    path: Path
    broadcast: np.ndarray | None = None  # the broadcast copy b, if stored; None: b = model


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _for_save(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What safetensors will write: each tensor as it is, a copy only where its memory overlaps a
    tensor's already taken (tied embeddings), which safetensors refuses. Views of one flat vector
    (the coordinator's master weights, server/aggregation.py) do not overlap: safetensors writes
    them in place too, so a checkpoint holds no copy of the model in memory."""
    out: dict[str, torch.Tensor] = {}
    taken: list[tuple[int, int]] = []  # [start, stop) byte ranges written as they are
    for k, v in tensors.items():
        v = v.detach().contiguous()
        start = v.data_ptr()
        stop = start + v.numel() * v.element_size()
        if any(start < b and a < stop for a, b in taken):
            out[k] = v.clone()
        else:
            out[k] = v
            taken.append((start, stop))
    return out


def save_checkpoint(
    run_dir: Path,
    round_: int,
    model: dict[str, torch.Tensor],
    outer: dict[str, torch.Tensor],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    broadcast: np.ndarray | None = None,
    keep: int = 0,
) -> Path:
    """Write round `round_`'s checkpoint whole or not at all; then drop all but the newest `keep`
    (0: keep every one). A base-size run writes 1 GB a round: kept forever, a long run fills the disk."""
    root = checkpoint_dir(run_dir)
    final = root / f"round-{round_:04d}"
    tmp = root / f".round-{round_:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_for_save(model), tmp / FILES[0])
    save_file(_for_save(outer), tmp / FILES[1])
    files = FILES
    if broadcast is not None:
        # No copy: b is replaced each round, never changed, so it can be written as it is.
        save_file({"params": torch.from_numpy(np.ascontiguousarray(broadcast, dtype=np.float32))}, tmp / BROADCAST_FILE)
        files = (*FILES, BROADCAST_FILE)
    meta = {
        "round": round_,
        "config": config,
        "sha256": {name: _sha256(tmp / name) for name in files},
        **(extra or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in sorted(root.glob("round-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one round's checkpoint, verifying every file against meta.json."""
    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} has no meta.json") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file {meta_path} is corrupted: {err}") from err
    stored = (*FILES, BROADCAST_FILE) if BROADCAST_FILE in meta.get("sha256", {}) else FILES
    for name in stored:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint file {file} is missing")
        digest = _sha256(file)
        if digest != meta.get("sha256", {}).get(name):
            raise CheckpointError(
                f"checkpoint file {file} is corrupted or truncated (SHA-256 {digest[:12]}... "
                f"does not match meta.json); delete {path} to resume from the previous round"
            )
    try:
        model, outer = load_file(path / FILES[0]), load_file(path / FILES[1])
        broadcast = load_file(path / BROADCAST_FILE)["params"].numpy() if BROADCAST_FILE in stored else None
    except (SafetensorError, OSError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    return Checkpoint(int(meta["round"]), model, outer, meta.get("config", {}), path, broadcast)


def latest_checkpoint(run_dir: Path,
                      on_refused: Callable[[CheckpointError], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupted ones are reported (and passed
    to `on_refused`) and skipped."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("round-*"), reverse=True):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log.error("refusing checkpoint: %s; trying the previous round", err)
            if on_refused is not None:
                on_refused(err)
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with file.open("rb") as fh:
            os.fsync(fh.fileno())
