"""The egress guard and ledger (clients/egress.py), alone, in the worker and in the ClientApp shell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients import app as shell
from clients.egress import (
    ALLOWED_METRICS,
    EgressBlocked,
    EgressGuard,
    describe,
    packed_manifest,
    read_ledger,
    violations,
)
from clients.worker import CentreWorker
from models.config import RunConfig, load_defaults
from models.gpt import build_model, parameter_manifest
from models.packing import PARAMS_KEY, pack

MANIFEST = {"w": ((3, 4), "float32"), "b": ((4,), "float32")}
SECRET = "patient 4711 has condition X"  # stands for any record of a centre's data


def _reply(**extra) -> dict:
    records = {
        "arrays": ("ArrayRecord", {"w": np.zeros((3, 4), np.float32), "b": np.ones(4, np.float32)}),
        "metrics": ("MetricRecord", {"train-loss": 2.5, "tokens": 100.0}),
        "centre": ("ConfigRecord", {"name": "fr-genci"}),
    }
    records.update(extra)
    return describe(records)


def test_a_conforming_reply_passes():
    assert violations(_reply(), MANIFEST, "fr-genci") == []


@pytest.mark.parametrize("change, expect", [
    ({"arrays": ("ArrayRecord", {"sample": np.frombuffer(SECRET.encode(), np.uint8)})}, "not a parameter"),
    ({"arrays": ("ArrayRecord", {"w": np.zeros((12,), np.float32)})}, "the model declares"),
    ({"arrays": ("ArrayRecord", {"w": np.zeros((3, 4), np.int64)})}, "the model declares"),
    ({"arrays": ("ArrayRecord", {"w": SECRET})}, "not an array"),
    ({"metrics": ("MetricRecord", {"train-loss": [1.0, 2.0]})}, "only scalar numbers"),
    ({"metrics": ("MetricRecord", {SECRET: 1.0})}, "not on the metric allow-list"),
    ({"metrics": ("ConfigRecord", {"train-loss": SECRET})}, "is not one a centre may send"),
    ({"centre": ("ConfigRecord", {"name": SECRET})}, "own name"),
    ({"centre": ("ConfigRecord", {"name": "fr-genci", "note": SECRET.encode()})}, "only 'name'"),
    ({"config": ("ConfigRecord", {"server-round": 3})}, "is not one a centre may send"),  # config echoed back
    ({SECRET: ("ArrayRecord", {})}, "is not one a centre may send"),
])
def test_anything_else_is_a_violation_that_quotes_no_data(change, expect):
    found = violations(_reply(**change), MANIFEST, "fr-genci")
    assert len(found) == 1 and expect in found[0], found
    assert SECRET not in found[0] and "4711" not in found[0]


def test_guard_records_every_reply_and_blocks_bad_ones(tmp_path):
    counted: list[str] = []
    guard = EgressGuard("fr-genci", tmp_path / "ledger.jsonl", on_blocked=counted.append)
    guard.check(_reply(), MANIFEST, run="r1", round=1, op="train", stage="worker-reply")
    bad = _reply(note=("ConfigRecord", {"text": SECRET}))
    with pytest.raises(EgressBlocked, match="is not one a centre may send") as err:
        guard.check(bad, MANIFEST, run="r1", round=2, op="train", stage="flower-reply")
    assert SECRET not in str(err.value)

    sent, blocked = read_ledger(guard.ledger)
    assert sent["verdict"] == "sent" and blocked["verdict"] == "blocked"
    assert (sent["run"], sent["round"], sent["op"], sent["stage"]) == ("r1", 1, "train", "worker-reply")
    assert sent["records"] == ["arrays", "centre", "metrics"] and sent["metrics"] == ["tokens", "train-loss"]
    w = next(a for a in sent["arrays"] if a["name"] == "w")
    assert (w["dtype"], w["shape"], w["bytes"]) == ("float32", [3, 4], 48) and len(w["sha256"]) == 64
    assert sent["bytes"] == 48 + 16
    assert blocked["violations"] and blocked["blocked-total"] == 1 and counted == ["r1"]
    assert SECRET not in guard.ledger.read_text()  # fingerprints only, never values
    # The count survives a worker restart (it is read back from the ledger).
    assert EgressGuard("fr-genci", guard.ledger).blocked_total == 1


def test_packed_manifest_is_one_flat_vector_of_all_parameters():
    manifest = parameter_manifest(build_model("tiny", seed=0))
    packed = packed_manifest(manifest, PARAMS_KEY)
    n = pack(build_model("tiny", seed=0).state_dict()).size
    assert packed == {PARAMS_KEY: ((n,), "float32")}


# ------------------------------------------------------------------ in the worker
# the `worker` fixture (a CentreWorker on a small prepared corpus) is in tests/conftest.py


def _run_config(tmp_path: Path) -> dict:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "inner-steps": 2, "eval-batches": 1,
                                   "run-name": "egress-test", "run-dir": str(tmp_path)}).to_mapping()


def _train(worker: CentreWorker, tmp_path: Path) -> tuple[dict, dict]:
    params = {PARAMS_KEY: pack(build_model("tiny", seed=0).state_dict())}
    return worker.handle({"op": "train", "round": 1, "run-config": _run_config(tmp_path)}, params)


def _metric_total(worker: CentreWorker) -> float:
    return worker.metrics.registry.get_sample_value(
        "bridgepool_egress_blocked_total", {"centre": "fr-genci", "run": "egress-test"}) or 0.0


def test_worker_reply_is_ledgered_and_uses_only_allowed_metrics(worker, tmp_path):
    reply, out = _train(worker, tmp_path)
    assert set(reply["metrics"]) <= ALLOWED_METRICS  # the trainer's names are all on the allow-list
    assert {"train-loss", "eval-loss", "tokens"} <= set(reply["metrics"])
    (entry,) = read_ledger(worker.state_dir / "egress-ledger.jsonl")
    assert entry["verdict"] == "sent" and entry["stage"] == "worker-reply" and entry["run"] == "egress-test"
    assert entry["arrays"][0]["name"] == PARAMS_KEY and entry["bytes"] == out[PARAMS_KEY].nbytes


def test_worker_blocks_a_reply_that_would_carry_data(worker, tmp_path, monkeypatch, caplog):
    from clients import training

    real = training.CentreTrainer.train_round

    def leaky(self, server_round, ahead=None):
        result = real(self, server_round, ahead)
        result.metrics["sample-bytes"] = float(self.train.tokens[0])  # a data byte under a new name
        return result

    monkeypatch.setattr(training.CentreTrainer, "train_round", leaky)
    with pytest.raises(EgressBlocked, match="metric allow-list"):
        _train(worker, tmp_path)
    (entry,) = read_ledger(worker.state_dir / "egress-ledger.jsonl")
    assert entry["verdict"] == "blocked" and _metric_total(worker) == 1.0
    assert "EGRESS BLOCKED" in caplog.text


# ------------------------------------------------------------ in the ClientApp shell
def _context(worker: CentreWorker, tmp_path: Path):
    from flwr.app import Context, RecordDict

    node = {"centre": "fr-genci", "data-dir": str(worker.data_dir), "state-dir": str(worker.state_dir)}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=_run_config(tmp_path))


def test_shell_blocks_a_reply_altered_after_the_worker(worker, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):  # what a SuperExec sets in a real ClientApp process
        monkeypatch.setattr(TaskIdentity, field, 1)
    monkeypatch.setattr(shell, "_local_workers", {"fr-genci": worker})  # the in-process path, no socket
    msg = Message(RecordDict({"arrays": ArrayRecord({PARAMS_KEY: Array(pack(build_model("tiny", 0).state_dict()))}),
                              "config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type="train")
    context = _context(worker, tmp_path)
    reply = shell.train(msg, context)  # the untouched reply passes both checks
    assert set(reply.content) == {"arrays", "metrics", "centre"}

    reply.content["arrays"]["sample"] = Array(worker._trainer.train.tokens[:256].copy())
    with pytest.raises(EgressBlocked, match="not a parameter of the model"):
        shell.release("train", msg, context, reply)
    reply.content["arrays"] = ArrayRecord({PARAMS_KEY: reply.content["arrays"][PARAMS_KEY]})
    reply.content["metrics"] = MetricRecord({"train-loss": 1.0, "eval-loss": 1.0, "tokens": 8.0})
    reply.content["echo"] = ConfigRecord({"text": SECRET})
    with pytest.raises(EgressBlocked, match="is not one a centre may send"):
        shell.release("train", msg, context, reply)

    stages = [(e["stage"], e["verdict"]) for e in read_ledger(worker.state_dir / "egress-ledger.jsonl")]
    assert stages == [("worker-reply", "sent"), ("flower-reply", "sent"),
                      ("flower-reply", "blocked"), ("flower-reply", "blocked")]
    assert _metric_total(worker) == 2.0
    assert json.dumps(read_ledger(worker.state_dir / "egress-ledger.jsonl")).count(SECRET) == 0
