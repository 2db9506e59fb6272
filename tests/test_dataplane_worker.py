"""The centre worker on the data plane (clients/worker.py): it pulls the round's model, trains, puts
its update in the ledger and uploads it itself, as the centre's only exit for model bytes; on a CPU
centre the model lands in, and leaves from, the model's own tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clients.dataplane import DataPlaneError
from models import blob
from models.packing import PARAMS_KEY
from server.dataplane import open_plane, upload_shapes


def _run_config(tmp_path: Path) -> dict:
    from models.config import RunConfig, load_defaults

    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "inner-steps": 2, "eval-batches": 1,
                                   "run-name": "dp-test", "run-dir": str(tmp_path)}).to_mapping()


def test_the_worker_pulls_trains_ledgers_and_uploads_itself(worker, tmp_path):
    from clients.egress import EgressBlocked, read_ledger
    from models.gpt import build_model
    from models.packing import pack

    initial = pack(build_model("tiny", seed=0).state_dict())
    shapes = upload_shapes(initial.size, "none", "fp32")
    p = open_plane("127.0.0.1", 0, "", "", "", shapes)
    try:
        manifest = blob.to_json(p.server.publish("train/2/full", {PARAMS_KEY: initial}))
        token = p.server.grant(1, 2, "train/2/full", shapes, ttl=60)
        header = {"op": "train", "round": 2, "run-config": _run_config(tmp_path), "broadcast": {"form": "full"},
                  "data-plane": {"url": p.url, "token": token, "manifest": manifest}}
        reply, out = worker.handle(header, {})
        assert out == {} and "upload" in reply  # no model bytes back through the ClientApp: only the manifest
        entries = blob.from_json(reply["upload"])
        got = p.server.take(token, {e.name: e.digest for e in entries})[PARAMS_KEY]
        assert got.shape == initial.shape and not np.array_equal(got, initial)  # it trained
        (entry,) = [e for e in read_ledger(worker.state_dir / "egress-ledger.jsonl") if e["stage"] == "data-plane"]
        assert entry["verdict"] == "sent" and entry["destination"] == p.url and entry["bytes"] == initial.nbytes
        assert entry["arrays"][0]["blake3"] == entries[0].digest  # the ledger holds what the server verified

        # The Flower reply may only repeat that manifest: another one is blocked at the shell's check.
        describe = {"metrics": {"type": "MetricRecord", "items": {}},
                    "upload": {"type": "ConfigRecord", "items": {"manifest": {"kind": "str", "len": 2,
                                                                             "sha256": "0" * 64}}}}
        check = {"op": "egress-check", "reply-to": "train", "round": 2, "run-config": _run_config(tmp_path)}
        with pytest.raises(EgressBlocked, match="record upload must hold only the manifest"):
            worker.handle({**check, "message": describe}, {})
    finally:
        p.server.stop()
    # A run that names another host for the data plane gets nothing from this centre.
    header["data-plane"] = {**header["data-plane"], "url": "http://10.9.9.9:9095"}
    with pytest.raises(DataPlaneError, match="not this centre's coordinator"):
        worker.handle(header, {})


def _update_from(worker, p, initial: np.ndarray, header: dict, rnd: int) -> np.ndarray:
    """The update `worker` uploads for round `rnd`, pulling `initial` on the data plane."""
    shapes = upload_shapes(initial.size, "none", header["run-config"]["wire-dtype"])
    manifest = blob.to_json(p.server.publish(f"train/{rnd}/full", {PARAMS_KEY: initial}))
    token = p.server.grant(rnd, rnd, f"train/{rnd}/full", shapes, ttl=60)
    reply, _ = worker.handle({**header, "round": rnd, "data-plane": {"url": p.url, "token": token,
                                                                     "manifest": manifest}}, {})
    entries = blob.from_json(reply["upload"])
    return next(iter(p.server.take(token, {e.name: e.digest for e in entries}).values())).copy()


@pytest.mark.parametrize("wire_dtype", ["fp32", "bf16"])
def test_the_model_lands_in_place_and_leaves_as_it_would_through_a_buffer(worker, tmp_path, wire_dtype, monkeypatch):
    """The worker writes the global model straight into its model's tensors and sends the update from
    them: the same bytes as through a buffer, and a download that fails half-way into them (a lying
    hash) is an error whose partial model the next round's download overwrites whole."""
    from clients import dataplane
    from clients.worker import CentreWorker
    from models.gpt import build_model
    from models.packing import pack

    state = build_model("tiny", seed=0).state_dict()
    initial = pack(state)
    # The tied weight's two copies differ (as after DP noise at the coordinator): the model must take
    # the values load_state_dict would, the last name's in the state dict.
    start = sum(state[k].numel() for k in sorted(state)[:sorted(state).index("lm_head.weight")])
    initial[start:start + state["lm_head.weight"].numel()] += np.float32(0.5)
    buffered = CentreWorker("fr-genci", worker.data_dir, tmp_path / "buffered-state")
    header = {"op": "train", "run-config": {**_run_config(tmp_path), "wire-dtype": wire_dtype},
              "broadcast": {"form": "full"}}
    landed, real_fetch = [], dataplane.fetch

    def fetch_spy(*args, **kw):  # which download path each round took
        landed.append(kw.get("into") is not None)
        return real_fetch(*args, **kw)

    monkeypatch.setattr(dataplane, "fetch", fetch_spy)
    p = open_plane("127.0.0.1", 0, "", "", "", upload_shapes(initial.size, "none", wire_dtype))
    try:
        in_place = _update_from(worker, p, initial, header, 2)
        tensors = worker._trainer.wire_tensors()
        buffered._trainer_for(header["run-config"]).wire_tensors = lambda landing=False: None  # the copying path
        assert np.array_equal(_update_from(buffered, p, initial, header, 2), in_place)
        assert landed == [True, False]

        # Round 3: the coordinator's blob does not match its hash; the worker refuses it.
        later = initial + np.float32(0.01)
        manifest = blob.to_json(p.server.publish("train/3/full", {PARAMS_KEY: later}))
        later[: later.size // 2] = 0.0  # the served bytes change after they were hashed
        token = p.server.grant(3, 3, "train/3/full", upload_shapes(initial.size, "none", wire_dtype), ttl=60)
        with pytest.raises(DataPlaneError, match="mismatch"):
            worker.handle({**header, "round": 3, "data-plane": {"url": p.url, "token": token, "manifest": manifest}},
                          {})
        assert [t.data_ptr() for t in worker._trainer.wire_tensors()] == [t.data_ptr() for t in tensors]
        # Round 3 again, served whole: both workers send the same update.
        later = initial + np.float32(0.01)
        assert np.array_equal(_update_from(worker, p, later, header, 3), _update_from(buffered, p, later, header, 3))
    finally:
        p.server.stop()


def test_round_one_trains_the_seed_model_prepare_hashed_without_packing_it(worker, tmp_path, monkeypatch):
    """Round 1 announces the run's seed model by its hash: a worker whose `prepare` built and hashed
    that model trains it where it is and sends the update from its tensors (no packed copy, no hash
    in the round), the same bytes as a worker that rebuilds and hashes the seed; and one whose model
    changed since `prepare` (or that is announced another model) takes the rebuilding path."""
    from clients import worker as worker_module
    from clients.worker import CentreWorker
    from models.gpt import build_model
    from models.packing import FORM_KEY, NEW_SHA_KEY, SEED, pack, vector_sha256

    initial = pack(build_model("tiny", seed=0).state_dict())
    cfg = _run_config(tmp_path)
    seed = {FORM_KEY: SEED, NEW_SHA_KEY: vector_sha256(initial)}
    shapes = upload_shapes(initial.size, "none", "fp32")
    packs = []
    monkeypatch.setattr(worker_module, "pack", lambda *a, **kw: packs.append(1) or pack(*a, **kw))

    def round_one(w: CentreWorker, broadcast: dict) -> np.ndarray:
        token = p.server.grant(1, 1, None, shapes, ttl=60)
        reply, _ = w.handle({"op": "train", "round": 1, "run-config": cfg, "broadcast": broadcast,
                             "data-plane": {"url": p.url, "token": token}}, {})
        entries = blob.from_json(reply["upload"])
        return next(iter(p.server.take(token, {e.name: e.digest for e in entries}).values())).copy()

    p = open_plane("127.0.0.1", 0, "", "", "", shapes)
    try:
        worker.handle({"op": "prepare", "round": 0, "run-config": cfg}, {})
        tensors = [t.data_ptr() for t in worker._trainer.wire_tensors()]
        seeded = round_one(worker, seed)
        assert packs == [] and [t.data_ptr() for t in worker._trainer.wire_tensors()] == tensors

        rebuilt = CentreWorker("fr-genci", worker.data_dir, tmp_path / "rebuilt-state")  # no prepare
        assert np.array_equal(round_one(rebuilt, seed), seeded) and packs  # its own weights packed and hashed

        # Prepared, then its weights changed: the digest no longer vouches for them.
        changed = CentreWorker("fr-genci", worker.data_dir, tmp_path / "changed-state")
        changed.handle({"op": "prepare", "round": 0, "run-config": cfg}, {})
        with torch.no_grad():
            changed._trainer.model.lm_head.weight.add_(1.0)
        changed._trainer.loaded_in_place()  # what every write into the weights declares
        before = len(packs)
        assert np.array_equal(round_one(changed, seed), seeded) and len(packs) > before  # rebuilt from the seed
        # Another model announced than the one prepared: refused as stale, not trained.
        other = CentreWorker("fr-genci", worker.data_dir, tmp_path / "other-state")
        other.handle({"op": "prepare", "round": 0, "run-config": cfg}, {})
        token = p.server.grant(1, 1, None, shapes, ttl=60)
        reply, _ = other.handle({"op": "train", "round": 1, "run-config": cfg,
                                 "broadcast": {**seed, NEW_SHA_KEY: "0" * 64},
                                 "data-plane": {"url": p.url, "token": token}}, {})
        assert reply["metrics"] == {"stale-base": 1.0}
    finally:
        p.server.stop()


@pytest.mark.parametrize("case", ["int8", "clip", "delta", "gpu", "no-token"])
def test_the_model_does_not_land_in_place_where_the_model_sent_is_still_needed(worker, tmp_path, case):
    """In place only where nothing needs the model that was sent after training: the int8 update and
    the policy's clip are taken against it; a delta applies to a held copy; a GPU model's tensors are
    not host memory. Each of these keeps the buffered path. (overlap-steps lands in place: the test
    below.)"""
    import dataclasses

    config, header, plane = _run_config(tmp_path), {"op": "train", "broadcast": {"form": "full"}}, {"token": "t"}
    assert worker._in_place(worker._trainer_for(config), header, plane) is not None  # the plain case: in place
    if case == "int8":
        config["compression"] = "int8"
    elif case == "clip":
        worker.policy = dataclasses.replace(worker.policy, update_clip=1.0)
    elif case == "delta":
        header["broadcast"] = {"form": "delta"}
    elif case == "no-token":
        plane = {}
    trainer = worker._trainer_for(config)
    if case == "gpu":
        trainer.device = torch.device("cuda")
    assert worker._in_place(trainer, header, plane) is None
    assert worker._in_place(trainer, header, plane, landing=True) is None


def test_the_next_rounds_model_is_pulled_ahead_and_used_only_if_the_message_announces_it(worker, tmp_path,
                                                                                           monkeypatch):
    """After a train reply with a read granted ahead (`next`), the worker pulls the next round's model
    into its tensors while the server aggregates; when the round's message announces that model, digest
    for digest, it trains on it with no second download, and uploads what a worker that fetched it with
    the round's message uploads. A message that announces another model is fetched as before."""
    from clients import dataplane
    from clients.worker import CentreWorker
    from models.gpt import build_model
    from models.packing import pack

    initial = pack(build_model("tiny", seed=0).state_dict())
    shapes = upload_shapes(initial.size, "none", "fp32")
    other = CentreWorker("fr-genci", worker.data_dir, tmp_path / "other-state")
    header = {"op": "train", "run-config": _run_config(tmp_path), "broadcast": {"form": "full"}}
    fetches, real_fetch = [], dataplane.fetch

    def fetch_spy(*args, **kw):
        fetches.append(args[2])  # the token: whose round it is
        return real_fetch(*args, **kw)

    def train(rnd: int, model: np.ndarray, ahead: bool) -> None:
        """Round `rnd` for both workers; `worker` also gets a read of round rnd + 1 granted ahead."""
        manifest = blob.to_json(p.server.publish(f"train/{rnd}/full", {PARAMS_KEY: model}))
        for w in (worker, other):
            plane = {"url": p.url, "token": p.server.grant(1, rnd, f"train/{rnd}/full", shapes, ttl=60),
                     "manifest": manifest}
            if ahead and w is worker:
                plane["next"] = p.server.grant_ahead(1, rnd + 1, f"train/{rnd + 1}/full", ttl=60)
            w.handle({**header, "round": rnd, "data-plane": plane}, {})
            w.after_reply()  # the serve loop's call once the reply has left: the pull starts, and waits

    monkeypatch.setattr(dataplane, "fetch", fetch_spy)
    p = open_plane("127.0.0.1", 0, "", "", "", shapes)
    try:
        train(2, initial, ahead=True)
        assert worker._prefetch_thread is not None and worker._prefetch_thread.is_alive()  # held until published
        fetches.clear()
        served = p.server.bytes_served
        later = initial + np.float32(0.01)
        assert np.array_equal(_update_from(worker, p, later, header, 3), _update_from(other, p, later, header, 3))
        assert len(fetches) == 1  # only `other` downloaded round 3 with its message
        assert p.server.bytes_served == served + 2 * initial.nbytes  # once per worker: ahead, or with the message

        # Pulled ahead, but the message announces another model (a coordinator that restarted): fetched again.
        train(4, later, ahead=True)
        p.server.publish("train/5/full", {PARAMS_KEY: initial})
        worker._prefetch_thread.join(timeout=30)
        fetches.clear()
        last = later + np.float32(0.02)
        assert np.array_equal(_update_from(worker, p, last, header, 5), _update_from(other, p, last, header, 5))
        assert len(fetches) == 2
    finally:
        p.server.stop()


def test_steps_ahead_leave_the_model_in_place_and_send_what_a_copying_worker_sends(worker, tmp_path, monkeypatch):
    """overlap-steps on the data plane: the steps ahead run in the background on the model's own tensors
    and keep their progress in the trainer's copy (clients/training.py), so the next round's model still
    lands in those tensors and the update leaves from them. Round after round, the same bytes as a worker
    that copies through buffers and trains its steps ahead only when the round comes."""
    from clients import dataplane
    from clients.worker import CentreWorker
    from models.gpt import build_model
    from models.packing import pack

    rc = {**_run_config(tmp_path), "overlap-steps": 1, "rounds": 3}
    header = {"op": "train", "run-config": rc, "broadcast": {"form": "full"}}
    buffered = CentreWorker("fr-genci", worker.data_dir, tmp_path / "buffered-state")
    buffered._trainer_for(rc).wire_tensors = lambda landing=False: None  # the copying path
    landed, real_fetch = [], dataplane.fetch

    def fetch_spy(*args, **kw):
        landed.append(kw.get("into") is not None)
        return real_fetch(*args, **kw)

    monkeypatch.setattr(dataplane, "fetch", fetch_spy)
    g = pack(build_model("tiny", seed=0).state_dict())
    p = open_plane("127.0.0.1", 0, "", "", "", upload_shapes(g.size, "none", "fp32"))
    try:
        for rnd in (1, 2, 3):
            tensors = [t.data_ptr() for t in worker._trainer.wire_tensors()] if worker._trainer else None
            mine = _update_from(worker, p, g, header, rnd)
            worker.after_reply()  # the serving loop's: the next round's first step, in a thread
            assert (worker._ahead_thread is not None) == (rnd < 3)
            assert tensors is None or tensors == [t.data_ptr() for t in worker._trainer.wire_tensors()]
            assert np.array_equal(mine, _update_from(buffered, p, g, header, rnd)), rnd
            g = ((mine + g) / 2).astype(np.float32)  # whatever the server made of the round
        assert landed == [True, False] * 3
        assert worker._trainer._kept is not None  # the copy the steps ahead start from, kept for the run
    finally:
        p.server.stop()
