"""The data plane (server/dataplane.py, clients/dataplane.py, models/blob.py) on loopback, real sockets.

Every refusal must leave nothing to aggregate: `take` then finds no update.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.dataplane import DataPlaneError, Destination, fetch, fetch_ahead, upload
from models import blob
from models.packing import BF16_KEY, INT8_KEY, PARAMS_KEY, SCALE_KEY, from_bf16_bits, to_bf16_bits
from server.aggregation import weighted_average
from server.dataplane import open_plane, upload_shapes

N = 300_000  # values: a few chunks of CHUNK bytes, so chunk boundaries fall inside arrays
SHAPES = upload_shapes(N, "none", "fp32")
LOCAL = Destination()


def _vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


@pytest.fixture()
def plane():
    p = open_plane("127.0.0.1", 0, "", "", "", SHAPES)
    yield p
    p.server.stop()


def _upload(plane, token: str, arrays: dict[str, np.ndarray]) -> list[blob.Entry]:
    entries = blob.layout(arrays)
    upload(LOCAL, plane.url, token, arrays, entries)
    return entries


def test_round_trip_global_and_update(plane):
    model = _vector(0)
    entries = plane.server.publish("train/1/full", {PARAMS_KEY: model})
    token = plane.server.grant(7, 1, "train/1/full", SHAPES, ttl=60)
    got = fetch(LOCAL, plane.url, token, blob.to_json(entries), SHAPES)
    assert np.array_equal(got[PARAMS_KEY], model)
    new = _vector(1)
    sent = _upload(plane, token, {PARAMS_KEY: new})
    taken = plane.server.take(token, {e.name: e.digest for e in sent})
    assert np.array_equal(taken[PARAMS_KEY], new) and plane.server.bytes_received == new.nbytes
    with pytest.raises(blob.BlobError, match="nothing was uploaded"):  # a slot is taken once
        plane.server.take(token, {e.name: e.digest for e in sent})


def test_int8_and_bf16_forms_travel_with_their_manifest():
    p = open_plane("127.0.0.1", 0, "", "", "", upload_shapes(N, "int8", "fp32"))
    try:
        q = {INT8_KEY: np.arange(N, dtype=np.int64).astype(np.int8), SCALE_KEY: np.ones(-(-N // 1024), np.float32)}
        token = p.server.grant(1, 1, None, p.upload, ttl=60)
        sent = blob.layout(q)
        upload(LOCAL, p.url, token, q, sent)
        got = p.server.take(token, {e.name: e.digest for e in sent})
        assert all(np.array_equal(got[k], q[k]) for k in q)
    finally:
        p.server.stop()
    bits = to_bf16_bits(_vector(3))
    p = open_plane("127.0.0.1", 0, "", "", "", upload_shapes(N, "none", "bf16"))
    try:
        token = p.server.grant(1, 1, None, p.upload, ttl=60)
        sent = blob.layout({BF16_KEY: bits}, {BF16_KEY: blob.BF16})
        upload(LOCAL, p.url, token, {BF16_KEY: bits}, sent)
        got = p.server.take(token, {e.name: e.digest for e in sent})[BF16_KEY]
        want = torch.from_numpy(_vector(3)).to(torch.bfloat16).float().numpy()
        assert np.array_equal(from_bf16_bits(got), want)
    finally:
        p.server.stop()


def test_a_lying_hash_is_refused_and_nothing_is_kept(plane):
    token = plane.server.grant(1, 1, None, SHAPES, ttl=60)
    arrays = {PARAMS_KEY: _vector(0)}
    entries = blob.layout(arrays)
    forged = [blob.Entry(e.name, e.dtype, e.shape, e.offset, e.nbytes, "0" * 64) for e in entries]
    with pytest.raises(DataPlaneError, match="blake3 mismatch"):
        upload(LOCAL, plane.url, token, arrays, forged)
    with pytest.raises(blob.BlobError, match="no update"):
        plane.server.take(token, {e.name: "0" * 64 for e in forged})


def test_the_reply_must_name_the_update_that_came(plane):
    token = plane.server.grant(1, 1, None, SHAPES, ttl=60)
    _upload(plane, token, {PARAMS_KEY: _vector(0)})
    other = blob.layout({PARAMS_KEY: _vector(1)})
    with pytest.raises(blob.BlobError, match="not the one the centre's reply names"):
        plane.server.take(token, {e.name: e.digest for e in other})


def _raw_put(port: int, token: str, manifest: str, length: int, body: bytes, close: bool = True) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"PUT /v1/update HTTP/1.0\r\nAuthorization: Bearer {token}\r\nContent-Length: {length}\r\n"
               f"X-Bridgepool-Manifest: {manifest}\r\n\r\n").encode() + body)
    if close:
        s.shutdown(socket.SHUT_WR)
    return s


def _wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_truncated_stream_is_refused(plane):
    token = plane.server.grant(1, 1, None, SHAPES, ttl=60)
    arrays = {PARAMS_KEY: _vector(0)}
    entries = blob.layout(arrays)
    raw = memoryview(arrays[PARAMS_KEY]).cast("B")
    s = _raw_put(plane.server.port, token, blob.to_json(entries), len(raw), bytes(raw[: len(raw) // 2]))
    s.recv(4096)  # the server answers (or closes) once it sees the end
    s.close()
    _wait_for(lambda: not plane.server._grants[token].busy, "the refused upload to finish")
    with pytest.raises(blob.BlobError, match="truncated"):
        plane.server.take(token, {e.name: e.digest for e in entries})


@pytest.mark.parametrize("case", ["shape", "dtype", "name", "length"])
def test_a_blob_of_the_wrong_size_is_refused_before_allocation(plane, case):
    token = plane.server.grant(1, 1, None, SHAPES, ttl=60)
    arrays = {"shape": {PARAMS_KEY: np.zeros(N + 1, np.float32)}, "dtype": {PARAMS_KEY: np.zeros(N, np.float64)},
              "name": {"secret": np.zeros(N, np.float32)}, "length": {PARAMS_KEY: np.zeros(N, np.float32)}}[case]
    entries = blob.layout(arrays)
    size = blob.total_bytes(entries) + (1 if case == "length" else 0)
    s = _raw_put(plane.server.port, token, blob.to_json(entries), size, b"", close=False)
    answer = s.makefile("rb").read().decode()  # until the server closes
    s.close()
    assert " 400 " in answer.splitlines()[0], answer
    assert {"shape": "allows", "dtype": "allows", "name": "not one the model", "length": "Content-Length"}[case] \
        in answer
    with pytest.raises(blob.BlobError, match="no update"):
        plane.server.take(token, {})


def test_wrong_missing_and_expired_tokens_are_refused(plane):
    model = {PARAMS_KEY: _vector(0)}
    manifest = blob.to_json(plane.server.publish("train/1/full", model))
    for token in ("not-a-token", ""):
        with pytest.raises(DataPlaneError, match="401 unknown or missing token"):
            fetch(LOCAL, plane.url, token, manifest, SHAPES)
        with pytest.raises(DataPlaneError, match="401"):
            _upload(plane, token, model)
    expired = plane.server.grant(1, 1, "train/1/full", SHAPES, ttl=0.05)
    time.sleep(0.1)
    with pytest.raises(DataPlaneError, match="expired"):
        fetch(LOCAL, plane.url, expired, manifest, SHAPES)
    with pytest.raises(DataPlaneError, match="expired"):
        _upload(plane, expired, model)
    with pytest.raises(blob.BlobError, match="no update"):
        plane.server.take(expired, {})


def test_no_centre_writes_another_centres_slot_or_reads_without_a_grant(plane):
    a = plane.server.grant(1, 1, None, SHAPES, ttl=60)
    b = plane.server.grant(2, 1, None, SHAPES, ttl=60)
    sent = _upload(plane, a, {PARAMS_KEY: _vector(0)})
    with pytest.raises(blob.BlobError, match="no update"):  # b's slot is empty: a wrote only its own
        plane.server.take(b, {e.name: e.digest for e in sent})
    with pytest.raises(DataPlaneError, match="409"):  # and a cannot overwrite its own
        _upload(plane, a, {PARAMS_KEY: _vector(1)})
    plane.server.publish("train/1/full", {PARAMS_KEY: _vector(2)})
    conn = http.client.HTTPConnection("127.0.0.1", plane.server.port)  # a's grant reads nothing
    conn.request("GET", "/v1/global", headers={"Authorization": f"Bearer {a}"})
    resp = conn.getresponse()
    assert resp.status == 404 and b"no model to read" in resp.read()


def test_a_late_upload_after_the_round_is_told_410_and_not_kept(plane):
    token = plane.server.grant(1, 1, None, SHAPES, ttl=60)
    plane.server.end_exchange()
    with pytest.raises(DataPlaneError, match="round 1 is over") as err:
        _upload(plane, token, {PARAMS_KEY: _vector(0)})
    assert err.value.status == 410


def test_three_concurrent_uploads_aggregate_bit_equal_to_in_memory(plane):
    updates = [_vector(10 + i) for i in range(3)]
    tokens = [plane.server.grant(i, 1, None, SHAPES, ttl=60) for i in range(3)]
    sent: list[list[blob.Entry]] = [[] for _ in range(3)]
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            sent[i] = _upload(plane, tokens[i], {PARAMS_KEY: updates[i]})
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    taken = [plane.server.take(t, {e.name: e.digest for e in s})[PARAMS_KEY] for t, s in zip(tokens, sent, strict=True)]
    weights = [3.0, 1.0, 2.0]
    streamed = weighted_average([{"p": torch.from_numpy(np.array(v))} for v in taken], weights)["p"]
    in_memory = weighted_average([{"p": torch.from_numpy(v)} for v in updates], weights)["p"]
    assert torch.equal(streamed, in_memory)


def test_a_coordinator_restart_mid_upload_loses_the_partial_update():
    first = open_plane("127.0.0.1", 0, "", "", "", SHAPES)
    port = first.server.port
    token = first.server.grant(1, 1, None, SHAPES, ttl=60)
    arrays = {PARAMS_KEY: _vector(0)}
    entries = blob.layout(arrays)
    raw = memoryview(arrays[PARAMS_KEY]).cast("B")
    s = _raw_put(port, token, blob.to_json(entries), len(raw), bytes(raw[:100_000]), close=False)
    _wait_for(lambda: first.server._grants[token].busy, "the upload to start")
    first.server.stop()  # the coordinator goes down mid-upload
    s.close()
    second = open_plane("127.0.0.1", port, "", "", "", SHAPES)  # and comes back on the same port
    try:
        with pytest.raises(DataPlaneError, match="401 unknown"):  # its tokens died with it
            upload(LOCAL, second.url, token, arrays, entries)
        fresh = second.server.grant(1, 2, None, SHAPES, ttl=60)  # the next round's grant works
        upload(LOCAL, second.url, fresh, arrays, entries)
        assert np.array_equal(second.server.take(fresh, {e.name: e.digest for e in entries})[PARAMS_KEY],
                              arrays[PARAMS_KEY])
    finally:
        second.server.stop()


def test_the_worker_sends_only_where_its_operator_allows():
    with pytest.raises(DataPlaneError, match="not this centre's coordinator"):
        LOCAL.check("http://10.0.0.5:9095")
    assert LOCAL.check("http://127.0.0.1:9095") == ("http", "127.0.0.1", 9095)
    pinned = Destination(("10.77.0.1",), "/pki/ca.crt")
    with pytest.raises(DataPlaneError, match="plaintext but this centre requires TLS"):
        pinned.check("http://10.77.0.1:9095")
    with pytest.raises(DataPlaneError, match="not this centre's coordinator"):
        pinned.check("https://127.0.0.1:9095")
    with pytest.raises(DataPlaneError, match="not http"):
        LOCAL.check("file:///etc/passwd")


def test_tls_with_the_deployments_ca(tmp_path: Path):
    key, crt = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    p = open_plane("127.0.0.1", 0, "", str(crt), str(key), SHAPES)
    try:
        assert p.url.startswith("https://")
        model = {PARAMS_KEY: _vector(0)}
        manifest = blob.to_json(p.server.publish("train/1/full", model))
        token = p.server.grant(1, 1, "train/1/full", SHAPES, ttl=60)
        trusted = Destination(("127.0.0.1",), str(crt))
        assert np.array_equal(fetch(trusted, p.url, token, manifest, SHAPES)[PARAMS_KEY], model[PARAMS_KEY])
        entries = blob.layout(model)
        upload(trusted, p.url, token, model, entries)
        with pytest.raises(DataPlaneError, match="CERTIFICATE_VERIFY_FAILED"):  # a centre without the CA
            fetch(Destination(("127.0.0.1",)), p.url, token, manifest, SHAPES)
    finally:
        p.server.stop()


def test_a_manifest_the_model_does_not_allow_is_refused_before_download(plane):
    entries = plane.server.publish("train/1/full", {PARAMS_KEY: _vector(0)})
    token = plane.server.grant(1, 1, "train/1/full", SHAPES, ttl=60)
    with pytest.raises(DataPlaneError, match="not this model's"):
        fetch(LOCAL, plane.url, token, blob.to_json(entries), upload_shapes(N + 1, "none", "fp32"))


def test_the_outer_step_does_not_write_over_a_model_still_being_downloaded():
    """The coordinator's b is the master weights' own vector, which the outer step writes in place; but
    not while a late centre is still downloading it: that download gets the bytes it was promised,
    whole, and the master weights move to a new vector first. With no download under way, b and the
    master weights stay one vector (no copy of the model, round after round)."""
    from models.packing import pack
    from server.aggregation import OuterOptimizer
    from server.app import _free_base, _sent
    from server.broadcast import Broadcast

    n = 16 << 20  # 64 MiB: more than the sockets' buffers hold, so the download is under way for a while
    state = {"w": torch.randn(n)}
    outer, broadcast = OuterOptimizer(state, "diloco", 0.7, 0.9), Broadcast(pack(state), "none")
    p = open_plane("127.0.0.1", 0, "", "", "", upload_shapes(n, "none", "fp32"))
    step = {"w": torch.full((n,), -1.0)}
    try:
        _sent(broadcast, outer, p)
        old = broadcast.base
        assert np.shares_memory(old, outer.vector())  # b is the master weights: no copy
        want = old.tobytes()
        p.server.publish("train/2/full", {PARAMS_KEY: old})
        token = p.server.grant(1, 2, "train/2/full", None, ttl=60)
        late = socket.socket()
        late.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        late.connect(("127.0.0.1", p.server.port))
        late.sendall(f"GET /v1/global HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        got = late.recv(1 << 16)
        _wait_for(lambda: p.server.reading(old), "the download to be under way")
        _free_base(broadcast, outer, p)  # what the round does before its outer step
        outer.apply(dict(step))
        assert not np.shares_memory(old, outer.vector())
        _sent(broadcast, outer, p)  # the next round's b, while the late centre reads on
        assert broadcast.base is not old and np.shares_memory(broadcast.base, outer.vector())
        while chunk := late.recv(1 << 20):
            got += chunk
        late.close()
        assert got.split(b"\r\n\r\n", 1)[1] == want
        _wait_for(lambda: not p.server.reading(old), "the download to end")
        # With no download under way, the step writes b itself, and b stays the master weights.
        last = broadcast.base
        _free_base(broadcast, outer, p)
        outer.apply(dict(step))
        _sent(broadcast, outer, p)
        assert np.shares_memory(broadcast.base, last) and np.array_equal(last, outer.params["w"].detach().numpy())
    finally:
        p.server.stop()


def test_a_read_granted_ahead_waits_for_its_model_and_is_used_once(plane):
    """The token a centre gets a round ahead reads the next round's model as soon as it is published,
    however long the round before takes to aggregate; the exchange that publishes it does not end it;
    it reads once; and where nothing comes it is answered 404 after a bounded wait."""
    token = plane.server.grant_ahead(7, 2, "train/2/full", ttl=60)
    into = blob.Pieces((np.zeros(N // 2, np.float32), np.zeros(N - N // 2, np.float32)))
    got: list = []
    pulling = threading.Thread(target=lambda: got.append(fetch_ahead(LOCAL, plane.url, token, SHAPES, into)))
    pulling.start()
    time.sleep(0.3)
    assert not got  # held: round 2's model is not published yet
    plane.server.end_exchange()  # round 2's exchange begins: ends round 1's grants, not this one
    model = _vector(2)
    entries = plane.server.publish("train/2/full", {PARAMS_KEY: model})
    pulling.join(timeout=10)
    assert got == [entries] and np.array_equal(np.concatenate(into.parts), model)
    with pytest.raises(DataPlaneError, match="410"):  # one read
        fetch_ahead(LOCAL, plane.url, token, SHAPES, into)
    with pytest.raises(DataPlaneError, match="the model allows"):  # checked before it lands
        fetch_ahead(LOCAL, plane.url, plane.server.grant_ahead(7, 2, "train/2/full", ttl=60),
                    upload_shapes(N + 1, "none", "fp32"), into)
    plane.server.ahead_wait = 0.2
    t0 = time.monotonic()
    with pytest.raises(DataPlaneError, match="404"):  # never published
        fetch_ahead(LOCAL, plane.url, plane.server.grant_ahead(7, 3, "train/3/full", ttl=60), SHAPES, into)
    assert time.monotonic() - t0 < 5
