"""Checkpoints: round trip, corrupted or truncated files refused, previous round used."""

import logging

import numpy as np
import pytest
import torch

from server.checkpoint import CheckpointError, _for_save, latest_checkpoint, load_checkpoint, save_checkpoint


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), v), "b": torch.arange(4, dtype=torch.float32) * v}


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path, 3, _state(1.5), {"a": torch.ones(2, 3)}, {"rounds": 5})
    ck = load_checkpoint(path)
    assert ck.round == 3 and ck.config == {"rounds": 5}
    assert all(torch.equal(ck.model[k], v) for k, v in _state(1.5).items())
    assert torch.equal(ck.outer["a"], torch.ones(2, 3))


def test_broadcast_copy_round_trip_and_verified(tmp_path):
    b = np.arange(5, dtype=np.float32) - 0.5
    path = save_checkpoint(tmp_path, 1, _state(1.0), {}, {}, broadcast=b)
    assert load_checkpoint(path).broadcast.tobytes() == b.tobytes()
    assert load_checkpoint(save_checkpoint(tmp_path, 2, _state(1.0), {}, {})).broadcast is None  # b = model
    (path / "broadcast.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(CheckpointError, match="broadcast.safetensors"):
        load_checkpoint(path)


def test_tied_tensors_are_saved(tmp_path):
    shared = torch.ones(2, 2)
    ck = load_checkpoint(save_checkpoint(tmp_path, 1, {"x": shared, "y": shared}, {}, {}))
    assert torch.equal(ck.model["x"], ck.model["y"])


def test_views_of_one_vector_are_written_in_place_and_only_overlaps_copied(tmp_path):
    # The coordinator's master weights are views of one flat vector (server/aggregation.py): a copy of
    # them would hold the model twice while a checkpoint is written.
    flat = torch.arange(10, dtype=torch.float32)
    views = {"a": flat[:6].view(2, 3), "b": flat[6:], "tied": flat[6:], "part": flat[8:]}
    kept = _for_save(views)
    assert kept["a"].data_ptr() == flat.data_ptr() and kept["b"].data_ptr() == flat[6:].data_ptr()
    assert kept["tied"].data_ptr() not in (flat[6:].data_ptr(), flat[8:].data_ptr())  # overlaps b: a copy
    assert kept["part"].data_ptr() != flat[8:].data_ptr()  # inside b: a copy
    ck = load_checkpoint(save_checkpoint(tmp_path, 1, views, {}, {}))
    assert all(torch.equal(ck.model[k], v) for k, v in views.items())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_checkpoint_is_refused_and_previous_used(tmp_path, caplog, damage):
    save_checkpoint(tmp_path, 1, _state(1.0), {}, {})
    bad = save_checkpoint(tmp_path, 2, _state(2.0), {}, {})
    model = bad / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(bad)
    with caplog.at_level(logging.ERROR):
        ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.round == 1
    assert "model.safetensors" in caplog.text


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
