"""Flat wire format: round trip, and malformed vectors rejected with a reason."""

import numpy as np
import pytest
import torch

from models.gpt import build_model
from models.packing import PackingError, pack, unpack
from server.validation import UpdateRejected, decode_update


def test_round_trip_on_a_real_model():
    state = build_model("tiny", seed=0).state_dict()
    vec = pack(state)
    assert vec.dtype == np.float32 and vec.ndim == 1
    back = unpack(vec, state)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k].float()) for k in state)


@pytest.mark.parametrize("bad,needle", [
    (np.zeros(5, dtype=np.float32), "values"),
    (np.zeros((2, 3), dtype=np.float32), "flat vector"),
    (np.zeros(6, dtype=np.float64), "dtype"),
])
def test_malformed_vectors(bad, needle):
    like = {"a": torch.zeros(2, 3)}
    with pytest.raises(PackingError, match=needle):
        unpack(bad, like)


def test_decode_update_rejects_extra_or_missing_arrays():
    like = {"a": torch.zeros(2)}
    good = np.ones(2, dtype=np.float32)
    assert torch.equal(decode_update({"params": good}, like)["a"], torch.ones(2))
    with pytest.raises(UpdateRejected, match="expected only 'params'"):
        decode_update({"params": good, "sample": np.frombuffer(b"secret", dtype=np.uint8)}, like)
    with pytest.raises(UpdateRejected):
        decode_update({}, like)
