"""Flat wire format: round trip, and malformed vectors rejected with a reason."""

import numpy as np
import pytest
import torch

from models.gpt import build_model
from models.packing import PackingError, pack, pack_bf16_bits, to_bf16_bits, unpack
from server.validation import UpdateRejected, decode_update


def test_round_trip_on_a_real_model():
    state = build_model("tiny", seed=0).state_dict()
    vec = pack(state)
    assert vec.dtype == np.float32 and vec.ndim == 1
    back = unpack(vec, state)
    assert sorted(back) == sorted(state)
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


def test_int8_round_trip_error_is_bounded_and_bytes_quartered():
    from models.packing import SCALE_KEY, dequantize_int8, quantize_int8

    rng = np.random.default_rng(0)
    delta = (rng.standard_normal(10_000) * 1e-3).astype(np.float32)
    q = quantize_int8(delta)
    back = dequantize_int8(q, delta.size)
    # Per-block rounding error is at most half a step: max|x| / 127 / 2.
    assert np.abs(back - delta).max() <= np.abs(delta).max() / 127 / 2 + 1e-9
    assert sum(a.nbytes for a in q.values()) <= 0.26 * delta.nbytes
    with pytest.raises(PackingError):
        dequantize_int8({**q, SCALE_KEY: np.full_like(q[SCALE_KEY], np.nan)}, delta.size)
    with pytest.raises(PackingError):
        dequantize_int8(q, delta.size + 1)


def test_packing_ignores_dict_order():
    # A checkpoint read back from safetensors is alphabetical, state_dict() is module order.
    state = build_model("tiny", seed=0).state_dict()
    shuffled = dict(sorted(state.items(), reverse=True))
    assert np.array_equal(pack(state), pack(shuffled))
    back = unpack(pack(shuffled), state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_bf16_straight_from_the_tensors_has_the_bits_of_the_fp32_vectors_rounding():
    state = build_model("tiny", seed=0).state_dict()
    state["z.edges"] = torch.tensor([1.0000001, 1.00390625, 1.005859375, -0.0, float("inf"), float("nan"),
                                     3.3895314e38, 1e-40])  # ties to even, overflow to inf, a subnormal
    want = to_bf16_bits(pack(state))
    out = np.full(want.size, 7, np.uint16)
    assert pack_bf16_bits(state, out) is out and out.tobytes() == want.tobytes()
    with pytest.raises(PackingError, match="expected a writable uint16"):
        pack_bf16_bits(state, np.empty(want.size - 1, np.uint16))


def test_pack_over_a_vector_it_is_given():
    state = build_model("tiny", seed=0).state_dict()
    want = pack(state)
    out = np.full(want.size, np.nan, np.float32)
    assert pack(state, out=out) is out and out.tobytes() == want.tobytes()
    for bad in (np.empty(want.size + 1, np.float32), np.empty(want.size, np.float64)):
        with pytest.raises(PackingError, match="expected a writable float32"):
            pack(state, out=bad)
