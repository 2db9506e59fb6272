"""The centre's side of the broadcast: the model the server last delivered (numpy, no Flower).

A server message carries the model in one of three forms (models/packing.py,
config key `form`; server/broadcast.py chooses): `full`, the flat fp32 vector;
`delta`, the int8 change from the copy this centre holds (`base-sha256`) to the
new one; `seed`, nothing: the run's initial model, built here from the seed.
`new-sha256` is the hash the result must have. When this centre cannot produce
it (no copy or another one: a restarted worker; a seed model that differs: another
torch version) it raises StaleBase, and the worker replies only `stale-base` = 1,
for which the server sends the full weights.

The copy lives in the worker's memory as a CPU numpy vector, also on GPU centres:
`apply_int8_delta` must run on the CPU in numpy to match the server bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from models.packing import (
    BASE_SHA_KEY,
    DELTA,
    FORM_KEY,
    FULL,
    INT8_KEY,
    NEW_SHA_KEY,
    PARAMS_KEY,
    SCALE_KEY,
    SEED,
    apply_int8_delta,
    vector_sha256,
)


class StaleBase(Exception):
    """This centre cannot rebuild the announced model; it needs the full weights."""


class HeldBase:
    """The broadcast model this centre holds, and its SHA-256 when the server labelled it."""

    def __init__(self) -> None:
        self.vector: np.ndarray | None = None
        self.sha: str | None = None

    def receive(self, config: Mapping[str, str], arrays: Mapping[str, np.ndarray],
                initial: Callable[[], np.ndarray] | Sequence[Callable[[], np.ndarray | None]]) -> np.ndarray:
        """The model to train from (now held), from a message's `config` and `arrays`.

        `initial` builds the run's initial model (packed), or is a list of ways to, cheapest
        first: the first whose result has the announced SHA-256 is taken (a way that returns None
        cannot build it here and is passed over). Raises StaleBase when
        the result cannot be rebuilt here, ValueError when the message is malformed.
        """
        form, want = config.get(FORM_KEY, FULL), config.get(NEW_SHA_KEY)
        if form == FULL:
            _expect(arrays, {PARAMS_KEY}, form)
            vector = np.asarray(arrays[PARAMS_KEY])
            if want is not None and vector_sha256(vector) != want:
                raise ValueError("the full weights do not match their announced SHA-256 (corrupted in transit?)")
        elif form == SEED:
            _expect(arrays, set(), form)
            for build in [initial] if callable(initial) else initial:
                built = build()
                if built is not None and vector_sha256(built) == want:
                    vector = built
                    break
            else:
                raise StaleBase("the model built from the run's seed differs from the server's "
                                "(another torch version?)")
        elif form == DELTA:
            _expect(arrays, {INT8_KEY, SCALE_KEY}, form)
            if self.vector is None or self.sha != config.get(BASE_SHA_KEY):
                raise StaleBase("this centre does not hold the model the delta applies to "
                                + ("(none held: a restarted worker?)" if self.vector is None else "(another one)"))
            vector = apply_int8_delta(self.vector, arrays)
            if vector_sha256(vector) != want:
                self.vector = self.sha = None
                raise StaleBase("the model rebuilt from the delta does not match the announced SHA-256")
        else:
            raise ValueError(f"unknown broadcast form {form!r}")
        self.vector, self.sha = vector, want
        return vector


def _expect(arrays: Mapping[str, np.ndarray], keys: set[str], form: str) -> None:
    if set(arrays) != keys:
        raise ValueError(f"a {form} message must carry arrays {sorted(keys)}, got {sorted(arrays)[:5]}")
