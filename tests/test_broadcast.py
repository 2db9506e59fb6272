"""The server->centre broadcast (server/broadcast.py, clients/broadcast.py): seed, int8 delta
with error feedback, stale bases, and resume, without Flower processes (tiny sizes)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from clients.broadcast import HeldBase, StaleBase
from clients.dataplane import Destination, fetch, upload
from clients.egress import read_ledger
from models import blob
from models.config import RunConfig, load_defaults
from models.gpt import build_model
from models.packing import (
    DELTA,
    FULL,
    INT8_KEY,
    PARAMS_KEY,
    SEED,
    STALE_BASE_METRIC,
    apply_int8_delta,
    int8_broadcast_step,
    pack,
    quantize_int8,
)
from server import messaging
from server.app import federate
from server.broadcast import Broadcast
from server.checkpoint import load_checkpoint
from server.dataplane import upload_shapes
from server.runlog import RunLog
from tests.test_liveness import serverapp_identity  # noqa: F401  (fixture: Messages outside a ServerApp)


def _vec(seed: int, n: int = 3000, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _receive(held: HeldBase, bc: Broadcast, node: int, initial: np.ndarray) -> np.ndarray:
    p = bc.payload(node)
    return held.receive(p.config, p.arrays, lambda: initial)


# ------------------------------------------------------------------ the maths
def test_server_and_centre_compute_the_same_bits_and_a_zero_delta_changes_nothing():
    initial = _vec(0)
    initial[:7] = -0.0  # b + 0.0 would turn these into +0.0
    bc, held = Broadcast(initial, "int8"), HeldBase()
    assert bc.advance(initial.copy()).tobytes() == initial.tobytes()  # m = b: b_new is b, bit for bit
    assert bc.payload(1).form == SEED and bc.payload(1).arrays == {}  # so round 1 sends no weights
    assert _receive(held, bc, 1, initial).tobytes() == initial.tobytes()
    bc.delivered(1)
    master = initial.copy()
    for rnd in range(2, 12):
        master -= 0.01 * _vec(rnd)  # an outer step
        server = bc.advance(master)
        p = bc.payload(1)
        assert p.form == DELTA and p.arrays[INT8_KEY].dtype == np.int8
        assert held.receive(p.config, p.arrays, lambda: initial).tobytes() == server.tobytes(), rnd
        bc.delivered(1)


def test_error_feedback_keeps_master_minus_broadcast_bounded():
    master, steps = _vec(0), [0.01 * _vec(100 + r) for r in range(300)]
    base, naive = master.copy(), master.copy()
    for step in steps:
        master -= step
        _, base = int8_broadcast_step(master, base)
        naive = apply_int8_delta(naive, quantize_int8(-step))  # each step quantised alone, no feedback
        # What is left out is at most half an int8 step of (step + what was left before).
        assert np.abs(master - base).max() <= 2 * np.abs(step).max() / 254
    assert np.abs(master - naive).max() > 10 * np.abs(master - base).max()  # without feedback it drifts


# ---------------------------------------------------------------- who gets what
def test_server_chooses_seed_delta_or_full_per_node():
    initial = _vec(0)
    bc = Broadcast(initial, "int8")
    bc.advance(initial)
    assert {bc.payload(n).form for n in (1, 2)} == {SEED}
    assert bc.payload(1, full=True).form == FULL
    bc.delivered(1)
    bc.advance(initial - 0.01)
    assert bc.payload(1).form == DELTA  # holds the previous b
    assert bc.payload(2).form == FULL and "new-sha256" in bc.payload(2).config  # no record
    bc.forget(1)  # an error or a missed deadline: unknown
    assert bc.payload(1).form == FULL
    resumed = Broadcast(initial, "int8", base=bc.base)  # a restarted server knows no node
    resumed.advance(initial - 0.02)
    assert resumed.payload(1).form == FULL

    fp32 = Broadcast(initial, "none")
    fp32.advance(initial)
    assert fp32.payload(1).form == SEED  # round 1 in fp32 too
    fp32.delivered(1)
    fp32.advance(initial - 0.01)
    p = fp32.payload(1)
    assert p.form == FULL and np.array_equal(p.arrays[PARAMS_KEY], initial - 0.01) and "new-sha256" not in p.config


def test_centre_refuses_what_it_cannot_rebuild():
    initial = _vec(0)
    bc, held = Broadcast(initial, "int8"), HeldBase()
    bc.advance(initial)
    with pytest.raises(StaleBase, match="another torch version"):
        _receive(held, bc, 1, initial + 1e-7)  # a seed model that differs
    # Ways to build the seed model, cheapest first (the worker's: its own model, then a new one): the first
    # with the announced hash is taken, and none with it is refused.
    built: list[str] = []
    seed = bc.payload(1)

    def way(name: str, vector: np.ndarray):
        return lambda: built.append(name) or vector

    got = HeldBase().receive(seed.config, seed.arrays, [way("own", initial + 1e-7), way("new", initial)])
    assert built == ["own", "new"] and got.tobytes() == initial.tobytes()
    got = HeldBase().receive(seed.config, seed.arrays, [lambda: None, way("new", initial)])  # sharded: not here
    assert got.tobytes() == initial.tobytes()
    with pytest.raises(StaleBase, match="another torch version"):
        HeldBase().receive(seed.config, seed.arrays, [way("own", initial + 1e-7)])
    held.receive(bc.payload(1, full=True).config, bc.payload(1, full=True).arrays, lambda: initial)
    bc.delivered(1)
    bc.advance(initial - 0.01)
    with pytest.raises(StaleBase, match="restarted worker"):
        _receive(HeldBase(), bc, 1, initial)  # a delta to a worker that holds nothing
    p = bc.payload(1, full=True)
    with pytest.raises(ValueError, match="SHA-256"):
        held.receive(p.config, {PARAMS_KEY: p.arrays[PARAMS_KEY] + 1}, lambda: initial)


# -------------------------------------------------------------- the real worker
# the `worker` fixture (a CentreWorker on a small prepared corpus) is in tests/conftest.py


def test_worker_builds_round_one_from_the_seed_and_answers_stale_base(worker, tmp_path):
    run_config = RunConfig.from_mapping({**load_defaults(), "model": "tiny", "inner-steps": 2, "eval-batches": 1,
                                         "batch-size": 2, "compression": "int8", "threads": 1, "run-name": "bc",
                                         "run-dir": str(tmp_path)}).to_mapping()
    bc = Broadcast(pack(build_model("tiny", seed=run_config["seed"]).state_dict()), "int8")
    bc.advance(bc.base)
    p = bc.payload(1)
    reply, out = worker.handle({"op": "train", "round": 1, "run-config": run_config, "broadcast": p.config}, {})
    assert p.form == SEED and set(out) == {"delta-int8", "delta-scale"} and reply["metrics"]["tokens"] > 0

    bc.advance(bc.base - 0.01)  # the server holds no record of this node: a delta it cannot apply
    wrong = {**bc.payload(7).config, "form": DELTA, "base-sha256": "0" * 64}
    reply, out = worker.handle({"op": "train", "round": 2, "run-config": run_config, "broadcast": wrong},
                               dict(quantize_int8(np.zeros(bc.base.size, np.float32))))
    assert reply["metrics"] == {STALE_BASE_METRIC: 1.0} and out == {}
    entry = read_ledger(worker.state_dir / "egress-ledger.jsonl")[-1]
    assert entry["verdict"] == "sent" and entry["metrics"] == [STALE_BASE_METRIC] and entry["bytes"] == 0


# ------------------------------------------- the real server loop, in-process grid
class CentresGrid:
    """Flower's Grid for `federate`: each node is a synthetic centre holding a HeldBase."""

    def __init__(self, initial: np.ndarray, nodes: int = 2, crash_at: int = 0, forget_at: int = 0):
        self.initial, self.crash_at, self.forget_at = initial, crash_at, forget_at
        self.held = {n: HeldBase() for n in range(1, nodes + 1)}
        self.sent: dict[str, Message] = {}
        self.ids = itertools.count()
        self.forms: list[tuple[int, int, str]] = []  # (round, node, form)

    def get_node_ids(self) -> list[int]:
        return list(self.held)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            rnd = int(msg.content["config"]["server-round"])
            if msg.metadata.message_type == "train" and rnd == self.crash_at:
                raise RuntimeError("coordinator killed")
            mid = f"m{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = msg
            if msg.metadata.message_type != "query":  # "get ready" (server/messaging.py prepare): no model
                self.forms.append((rnd, msg.metadata.dst_node_id, str(msg.content["config"]["form"])))
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self._answer(self.sent.pop(mid)) for mid in ids if mid in self.sent]

    def _answer(self, msg: Message) -> Message:
        node, rnd = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
        if rnd == self.forget_at and node == 1 and msg.metadata.message_type == "train":
            self.held[node], self.forget_at = HeldBase(), 0  # the worker restarted
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()} if "arrays" in msg.content else {}
        config = {k: str(v) for k, v in msg.content["config"].items() if k != "server-round"}
        plane = {k.removeprefix("dp-"): v for k, v in config.items() if k.startswith("dp-")}  # as clients/app.py
        config = {k: v for k, v in config.items() if not k.startswith("dp-")}
        if plane.get("manifest"):  # data plane: the worker's own pull (clients/dataplane.py)
            shapes = {**upload_shapes(self.initial.size, "int8", "fp32"), **upload_shapes(self.initial.size, "none",
                                                                                           "fp32")}
            arrays = fetch(Destination(), plane["url"], plane["token"], plane["manifest"], shapes)
        content = RecordDict({"centre": ConfigRecord({"name": f"c{node}"})})
        if msg.metadata.message_type == "query":
            return Message(content=content, reply_to=msg)
        try:
            sent = self.held[node].receive(config, arrays, lambda: self.initial)
        except StaleBase:
            content["metrics"] = MetricRecord({STALE_BASE_METRIC: 1.0})
            return Message(content=content, reply_to=msg)
        local = sent - 0.01 * _vec(100 * rnd + node, sent.size) * np.abs(sent).mean()  # "training"
        content["metrics"] = MetricRecord({"tokens": 100.0, "train-loss": 1.0, "eval-loss": 1.0})
        update = quantize_int8(sent - local)
        if plane.get("token") and msg.metadata.message_type == "train":  # and its own upload
            entries = blob.layout(update)
            upload(Destination(), plane["url"], plane["token"], update, entries)
            content["upload"] = ConfigRecord({"manifest": blob.to_json(entries)})
        else:
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in update.items()})
        return Message(content=content, reply_to=msg)


def _cfg(run_dir, **over) -> RunConfig:
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": 4, "compression": "int8",
                                   "expected-centres": 2, "connect-timeout": 5.0, "round-timeout": 5.0,
                                   "run-dir": str(run_dir), "run-name": "bc", **over})


@pytest.mark.parametrize("data_plane", ["stream", "flower"])
def test_int8_run_sends_deltas_resends_stale_and_resumes_bit_identically(tmp_path, monkeypatch, data_plane):
    monkeypatch.setattr(messaging, "POLL_SECONDS", 0.0)
    cfg = _cfg(tmp_path / "a", **{"data-plane": data_plane})
    initial = pack(build_model("tiny", seed=cfg.seed).state_dict())
    grid = CentresGrid(initial, forget_at=3)
    federate(grid, cfg, tmp_path / "a", RunLog(tmp_path / "a", cfg.to_mapping()))
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["rounds"][0]["bytes-sent"] == 0  # round 1: the seed's hash only
    assert 0 < run["rounds"][1]["bytes-sent"] <= 0.26 * 2 * initial.nbytes  # int8 deltas
    assert run["rounds"][2]["stale-base"] == {"c1": DELTA} and run["rounds"][2]["replied"] == 2
    assert (3, 1, FULL) in grid.forms and all(r["replied"] == 2 for r in run["rounds"])
    if data_plane == "stream":  # every update came on the data plane, and the models went out on it
        plane = run["rounds"][-1]["data-plane"]
        assert plane["bytes-received"] == sum(r["bytes-received"] for r in run["rounds"]) > 0
        assert plane["bytes-served"] == sum(r["bytes-sent"] for r in run["rounds"]) > 0
    else:
        assert "data-plane" not in run["rounds"][-1]

    cfg_b = _cfg(tmp_path / "b", **{"data-plane": data_plane})
    with pytest.raises(RuntimeError, match="coordinator killed"):  # dies as round 3 starts
        federate(CentresGrid(initial, crash_at=3, forget_at=3), cfg_b, tmp_path / "b",
                 RunLog(tmp_path / "b", cfg_b.to_mapping()))
    resumed = cfg_b.replace(resume=True)
    federate(CentresGrid(initial), resumed, tmp_path / "b", RunLog(tmp_path / "b", resumed.to_mapping(), resume=True))

    a, b = load_file(tmp_path / "a" / "final_model.safetensors"), load_file(tmp_path / "b" / "final_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck_a, ck_b = (load_checkpoint(p / "checkpoints" / "round-0004") for p in (tmp_path / "a", tmp_path / "b"))
    assert ck_a.broadcast is not None and ck_a.broadcast.tobytes() == ck_b.broadcast.tobytes()
    assert not np.array_equal(ck_a.broadcast, pack(ck_a.model))  # b is its own state, not m
