"""What the server sends each centre, and which model each centre holds (numpy, no Flower).

The server keeps two models: the master weights m (the outer optimiser's) and the
broadcast copy b, the model the centres actually hold and train from. With
compression "none", b = m and every message carries it in full (fp32). With
"int8", a message carries q = int8(m - b) only; the server and each centre compute
b_new = b + dequantised q with the same function (models/packing.py
`apply_int8_delta`), bit for bit, and the part q leaves out (m - b_new) is sent in
a later round (error feedback). Centres train from b_new and their
pseudo-gradients are taken against it (server/app.py validates and aggregates
against it); the outer step applies them to m.

Per node the server remembers the SHA-256 of the b it last delivered: a reply that
is not an error means the node now holds that message's b_new. A node with no
record (new, restarted, a deadline missed, or this server restarted) gets b_new in
full. While b_new is still the run's initial model (round 1), no weights travel at
all: the message carries b_new's SHA-256 and the centre builds the model from the
run's seed. A centre that cannot produce the announced hash (a restarted worker,
another torch version) replies the metric `stale-base` = 1 and is sent the full
weights within the same round (server/messaging.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.packing import (
    BASE_SHA_KEY,
    DELTA,
    FORM_KEY,
    FULL,
    NEW_SHA_KEY,
    PARAMS_KEY,
    SEED,
    int8_broadcast_step,
    vector_sha256,
)


@dataclass(frozen=True)
class Payload:
    form: str  # FULL | DELTA | SEED (models/packing.py)
    arrays: dict[str, np.ndarray]  # empty for SEED
    config: dict[str, str]  # FORM_KEY and the hashes the centre checks


class Broadcast:
    """The broadcast copy b, the delta that produced it, and which node holds which b."""

    def __init__(self, initial: np.ndarray, compression: str, base: np.ndarray | None = None):
        if compression not in ("none", "int8"):
            raise ValueError(f"unknown compression {compression!r}; choose none or int8")
        self.compression = compression
        self.initial_sha = vector_sha256(initial)
        self._initial_sample = _sample(initial)  # to skip hashing a b that cannot be the initial model
        self.base = np.asarray(initial if base is None else base, dtype=np.float32)  # b
        self.base_sha = self.initial_sha if base is None else vector_sha256(self.base)
        self.held: dict[int, str] = {}  # node id -> SHA-256 of the b it holds
        self._delta: dict[str, np.ndarray] | None = None  # q of the current message (int8)
        self._from_sha = self.base_sha  # the b that q applies to

    def advance(self, master: np.ndarray, owned: bool = False) -> np.ndarray:
        """Start a message for master weights `master`: b becomes b_new, which is returned
        (the reference the replies are validated and aggregated against). `owned`: `master` is a
        fresh fp32 vector nobody else changes, kept as b without a copy."""
        self._from_sha = self.base_sha
        if self.compression == "int8":
            self._delta, self.base = int8_broadcast_step(master, self.base)
        else:
            self._delta, self.base = None, master if owned else np.array(master, dtype=np.float32, copy=True)
        # With int8 every b is labelled (deltas name the b they apply to). Without, the label only
        # says "this is the initial model" (round 1 sends no weights): ~0.4 s of SHA-256 per round
        # for 127M parameters is spent only when a sample of b matches the initial model's.
        maybe_initial = np.array_equal(_sample(self.base), self._initial_sample)
        self.base_sha = vector_sha256(self.base) if self.compression == "int8" or maybe_initial else ""
        return self.base

    def payload(self, node: int, full: bool = False) -> Payload:
        """What `node` is sent for the current b_new (`full`: the weights, whatever it holds)."""
        new = {NEW_SHA_KEY: self.base_sha}
        if not full and self.base_sha == self.initial_sha:
            return Payload(SEED, {}, {FORM_KEY: SEED, **new})
        if not full and self._delta is not None and self.held.get(node) == self._from_sha:
            return Payload(DELTA, self._delta, {FORM_KEY: DELTA, BASE_SHA_KEY: self._from_sha, **new})
        # fp32: no hash, as before (the centre never gets a delta, so it need not label its copy).
        return Payload(FULL, {PARAMS_KEY: self.base}, {FORM_KEY: FULL, **(new if self.compression == "int8" else {})})

    def delivered(self, node: int) -> None:
        """`node` answered the current message: it holds b_new."""
        self.held[node] = self.base_sha

    def forget(self, node: int) -> None:
        """What `node` holds is unknown (error, no reply): its next message is the full model."""
        self.held.pop(node, None)


def _sample(vector: np.ndarray, n: int = 4096) -> np.ndarray:
    """About `n` values spread over `vector` (a copy): equal samples are necessary for equal vectors."""
    return np.array(vector[:: max(1, vector.size // n)], copy=True)
