"""The coordinator's spool (server/spool.py, server/chunked.py): updates from the data plane wait on disk,
and a round screens and sums them a chunk at a time, bit-equal to aggregating them in memory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.dataplane import upload
from models import blob
from models.packing import BF16_KEY, PARAMS_KEY, to_bf16_bits
from server.dataplane import open_plane, upload_shapes
from tests.test_dataplane import LOCAL, SHAPES, N, _raw_put, _upload, _vector, _wait_for


def _spooled_plane(tmp_path: Path, shapes=SHAPES):
    return open_plane("127.0.0.1", 0, "", "", "", shapes, spool=tmp_path / "spool")


def _updates(tmp_path: Path) -> list[Path]:
    """The spool's update files (spares, discarded updates' files waiting to be written over, aside)."""
    return [p for p in (tmp_path / "spool").iterdir() if not p.name.startswith("spare-")]


def _concurrently(plane, forms: list[dict[str, np.ndarray]]) -> list:
    """Upload each form at once from its own thread; the spooled updates, taken as the replies name them."""
    tokens = [plane.server.grant(i, 1, None, plane.upload, ttl=60) for i in range(len(forms))]
    sent: list[list[blob.Entry]] = [[] for _ in forms]
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            entries = blob.layout(forms[i], {BF16_KEY: blob.BF16})  # as the worker lays out its update
            upload(LOCAL, plane.url, tokens[i], forms[i], entries)
            sent[i] = entries
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(forms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    return [plane.server.take(t, {e.name: e.digest for e in s}) for t, s in zip(tokens, sent, strict=True)]


@pytest.mark.parametrize("form", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("method", ["mean", "trimmed-mean"])
def test_three_concurrent_spooled_uploads_aggregate_bit_equal_to_in_memory(tmp_path, form, method):
    from server.aggregation import OuterOptimizer, round_update
    from server.chunked import Layout, combined, screen_and_mean
    from server.spool import SpooledUpdate
    from server.validation import decode_update

    ref_vec = _vector(1)
    reference = {"a": torch.from_numpy(ref_vec[:1000].copy()).reshape(10, 100),
                 "b": torch.from_numpy(ref_vec[1000:].copy())}  # two tensors: chunks cross their border
    news = [ref_vec - 0.01 * _vector(20 + i) for i in range(3)]
    if form == "int8":
        from models.packing import quantize_int8
        forms = [quantize_int8(ref_vec - n) for n in news]
    elif form == "bf16":
        forms = [{BF16_KEY: to_bf16_bits(n)} for n in news]
    else:
        forms = [{PARAMS_KEY: n} for n in news]
    int8 = form == "int8"
    plane = _spooled_plane(tmp_path, upload_shapes(N, "int8" if int8 else "none", "fp32" if int8 else form))
    try:
        spooled = _concurrently(plane, forms)
        assert all(isinstance(s, SpooledUpdate) and s.path.exists() for s in spooled)
        assert sorted(p.stat().st_mode & 0o777 for p in (tmp_path / "spool").iterdir()) == [0o600] * 3
        tokens = [300.0, 100.0, 200.0]
        metrics = [{"tokens": t, "train-loss": 1.0, "eval-loss": 1.0} for t in tokens]

        def aggregate(updates: list, into: np.ndarray | None = None) -> np.ndarray:
            """What the ServerApp does with a round's spooled updates: screen (and fold), or combine."""
            kept, rejected, folded = screen_and_mean(list(zip(updates, metrics, strict=True)), ref_vec,
                                                     Layout.of(reference), 0.0, 1e9, fold=method == "mean", into=into)
            assert not rejected and list(kept) == [0, 1, 2]
            if method == "mean":
                return folded
            return combined(updates, tokens, list(kept.values()), ref_vec, method, 0.0, 0.0, into=into)

        streamed = aggregate(spooled)
        outer = OuterOptimizer(reference, "diloco", 0.7, 0.9)
        in_memory = round_update(outer, [decode_update(f, reference) for f in forms], tokens, method,
                                 reference=reference)
        assert torch.equal(torch.from_numpy(streamed), torch.cat([t.reshape(-1) for t in in_memory.values()]))
        # Summed again in the last round's vector (what the ServerApp does), whatever it holds: the same bits.
        last = np.full(N, np.nan, np.float32)
        again = aggregate(spooled, into=last)
        assert again is last and again.tobytes() == streamed.tobytes()
        for s in spooled:
            s.discard()
        assert not _updates(tmp_path) and len(list((tmp_path / "spool").iterdir())) == 3
        # The next round's uploads are written over the three spares: no new file, the same sum.
        spooled = _concurrently(plane, forms)
        assert len(list((tmp_path / "spool").iterdir())) == 3 and len(_updates(tmp_path)) == 3
        assert all(s.path.stat().st_size == s.nbytes for s in spooled)
        assert aggregate(spooled).tobytes() == streamed.tobytes()
        for s in spooled:
            s.discard()
    finally:
        plane.server.stop()
    assert not (tmp_path / "spool").exists()


def test_a_spooled_update_refused_late_is_left_out_of_the_sum(tmp_path):
    """A NaN deep in one update: folded in before it was found, so the sum is taken again without it."""
    from server.aggregation import mean_pseudo_gradient
    from server.chunked import Layout, screen_and_mean, weighted_mean

    ref_vec = _vector(2)
    reference = {"w": torch.from_numpy(ref_vec.copy())}
    good, bad = ref_vec - 0.01 * _vector(3), ref_vec - 0.01 * _vector(4)
    bad[N - 5] = np.nan  # in the last chunk: the first chunks were folded already
    plane = _spooled_plane(tmp_path)
    try:
        spooled = _concurrently(plane, [{PARAMS_KEY: good}, {PARAMS_KEY: bad}, {PARAMS_KEY: good.copy()}])
        metrics = [{"tokens": 10.0, "train-loss": 1.0, "eval-loss": 1.0}] * 3
        kept, rejected, folded = screen_and_mean(list(zip(spooled, metrics, strict=True)), ref_vec,
                                                 Layout.of(reference), 0.0, 1e9)
        assert folded is None and list(kept) == [0, 2]
        assert rejected[1].reason == "non-finite" and "w contains NaN" in str(rejected[1])
        again = weighted_mean([spooled[0], spooled[2]], [10.0, 10.0], ref_vec)
        expect = mean_pseudo_gradient(reference, [{"w": torch.from_numpy(good)}] * 2, [10.0, 10.0])["w"]
        assert torch.equal(torch.from_numpy(again), expect)
    finally:
        plane.server.stop()


def test_a_truncated_or_late_spooled_upload_leaves_no_file(tmp_path):
    plane = _spooled_plane(tmp_path)
    try:
        token = plane.server.grant(1, 1, None, SHAPES, ttl=60)
        arrays = {PARAMS_KEY: _vector(5)}
        entries = blob.layout(arrays)
        raw = memoryview(arrays[PARAMS_KEY]).cast("B")
        s = _raw_put(plane.server.port, token, blob.to_json(entries), len(raw), bytes(raw[:200_000]), close=False)
        _wait_for(lambda: any((tmp_path / "spool").iterdir()), "the upload's spool file")
        s.close()  # the centre dies mid-upload
        _wait_for(lambda: not plane.server._grants[token].busy, "the upload to end")
        assert not list((tmp_path / "spool").iterdir())
        with pytest.raises(blob.BlobError, match="truncated"):
            plane.server.take(token, {e.name: e.digest for e in entries})
        late = plane.server.grant(2, 1, None, SHAPES, ttl=60)
        _upload(plane, late, arrays)
        plane.server.end_exchange()  # the round ended before its reply was taken: dropped with it
        assert not _updates(tmp_path) and len(list((tmp_path / "spool").iterdir())) == 1  # a spare
        # Truncated while written over the spare: neither an update nor the spare is left.
        token = plane.server.grant(3, 2, None, SHAPES, ttl=60)
        s = _raw_put(plane.server.port, token, blob.to_json(entries), len(raw), bytes(raw[:200_000]), close=False)
        _wait_for(lambda: _updates(tmp_path), "the upload's spool file")
        s.close()
        _wait_for(lambda: not plane.server._grants[token].busy, "the upload to end")
        assert not list((tmp_path / "spool").iterdir())
    finally:
        plane.server.stop()
