"""What the centre worker (clients/worker.py) knows of its model as it travels: the manifests a
reply and a server message may carry, the weights packed or hashed from the trainer's own tensors,
whether a model pulled ahead landed, and where a request's time went. Kept apart from the worker's
request loop so that each file holds one responsibility."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from clients.egress import Manifest, packed_manifest
from clients.training import CentreTrainer
from models import blob
from models.packing import BF16_KEY, INT8_BLOCK, INT8_KEY, PARAMS_KEY, SCALE_KEY, pack


class Phases:
    """Seconds per phase of one request, for the worker's log line: where a round's time goes."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """The time since the last mark was spent on `phase`."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())


def own_weights(trainer: CentreTrainer) -> np.ndarray | None:
    """The trainer's model, packed; None when its ranks shard it (DTensors: packing them takes
    collectives that the other ranks are not in, here)."""
    state = trainer.model.state_dict()
    if any(type(v) is not torch.Tensor for v in state.values()):
        return None
    return pack(state)


def weights_digest(trainer: CentreTrainer) -> str | None:
    """`vector_sha256(pack(state))` of the trainer's model, hashed from its own tensors in the wire's
    order (no packed copy); None where they are not one whole CPU fp32 model (`wire_tensors`)."""
    tensors = trainer.wire_tensors()
    if tensors is None:
        return None
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(memoryview(t.detach().numpy()).cast("B"))
    return digest.hexdigest()


def landed(prefetched: tuple[CentreTrainer, list[blob.Entry], float] | None, trainer: CentreTrainer,
            manifest: str) -> bool:
    """Whether the model pulled ahead into `trainer`'s tensors is the one `manifest` (the round's Flower
    message, authenticated) announces: the same arrays and digests as the data plane served and the
    download verified."""
    if prefetched is None or prefetched[0] is not trainer:
        return False
    try:
        return blob.from_json(manifest) == prefetched[1]
    except blob.BlobError:
        return False


def wire_manifest(params: Manifest) -> Manifest:
    """The arrays a reply may carry (models/packing.py): the weights as one flat fp32 vector,
    or the pseudo-gradient as int8 values with one fp32 scale per block; nothing else."""
    flat = packed_manifest(params, PARAMS_KEY)
    n = flat[PARAMS_KEY][0][0]
    return {**flat, INT8_KEY: ((n,), "int8"), SCALE_KEY: ((-(-n // INT8_BLOCK),), "float32"),
            BF16_KEY: ((n,), blob.BF16)}  # wire-dtype bf16, data plane only


def broadcast_manifest(wire: Manifest) -> Manifest:
    """What a server message may carry: the full fp32 weights or an int8 delta (server/broadcast.py)."""
    return {k: v for k, v in wire.items() if k in (PARAMS_KEY, INT8_KEY, SCALE_KEY)}
