"""Red team, issue 19: can a node answer as another node? Against a real SuperLink with TLS and SuperNode
authentication (Flower 1.41), node B, authenticated with its own registered key, pushes a reply to node A's
instruction claiming to be A, with A's centre name and a marked loss.

Flower's SuperLink checks that a Fleet request's `node.node_id` belongs to the signing key, and that a reply's
`src_node_id` is its instruction's destination, but never that the two are the same node: read in
flwr/superlink/servicer/fleet/fleet_handlers.py `push_messages` and linkstate `store_message_res`. So the forged
reply is stored as A's, and A's own reply is then refused as a second one. This test shows both sides on one run:
- round 1's train reply, forged through the Fleet gate (the only door the centres have, server/fleetgate.py):
  refused 403 and logged by the gate; A's own update is the one aggregated;
- the final evaluation's reply, forged on the SuperLink's loopback port (what only the coordinator's host
  reaches): Flower takes it as A's (the marked loss is in run.json), which is why the gate checks.
And a node cannot push an *instruction* to another node as the SuperLink: the gate refuses that too.

The forger uses Flower's own Fleet HTTP client and SuperNode signing (FleetHttpClient, NodeAuthHttpInterceptor):
every touch of Flower's private names for it is in this file.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.app.metadata import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import push_objects
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from deploy.local import LocalFederation
from models.gpt import build_model
from models.packing import pack
from server.validation import token_cap
from tests.conftest import free_base_port, make_centres
from tests.test_intruders import make_pki, node_id
from tests.test_multinode import one_round

MARK = 0.123456  # the forger's loss: wherever it shows up in run.json, the forged reply was taken
RECEIVING = re.compile(r"\[RUN (\d+), ROUND \w+\]\s*\n.*Receiving: (\w+) message \(ID: (\w+)\)")


class Forger:
    """Node `node` (its own key, its own node id) speaking Flower's Fleet HTTP API at `address`."""

    def __init__(self, address: str, ca_cert: str, key_path: str, node: int) -> None:
        key = load_ssh_private_key(Path(key_path).read_bytes(), password=None)
        self.node = Node(node_id=node)
        self.client = FleetHttpClient.from_server_address(
            address, insecure=False, root_certificates=Path(ca_cert).read_bytes(),
            interceptors=[NodeAuthHttpInterceptor(key, key.public_key())])  # type: ignore[arg-type]

    def reply_as(self, victim: int, run_id: int, instruction_id: str, message_type: str, content: RecordDict) -> None:
        """Push `content` as `victim`'s reply to its instruction `instruction_id` (learned, not received)."""
        instruction = make_message(Metadata(run_id=run_id, message_id=instruction_id, src_node_id=SUPERLINK_NODE_ID,
                                            dst_node_id=victim, reply_to_message_id="", group_id="1",
                                            created_at=time.time(), ttl=120.0, message_type=message_type),
                                   content=RecordDict())
        self._push(Message(content, reply_to=instruction), run_id)  # src_node_id: the victim's

    def instruct(self, victim: int, run_id: int, content: RecordDict) -> None:
        """Push an instruction to `victim` as if the SuperLink (the ServerApp) sent it."""
        self._push(make_message(Metadata(run_id=run_id, message_id="", src_node_id=SUPERLINK_NODE_ID,
                                         dst_node_id=victim, reply_to_message_id="", group_id="1",
                                         created_at=time.time(), ttl=120.0, message_type="train"),
                                content=content), run_id)

    def _push(self, message: Message, run_id: int) -> None:
        message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's ClientApp runtime does
        response = self.client.PushMessages(PushMessagesRequest(
            node=self.node, messages_list=[message_to_proto(remove_content_from_message(message))],
            message_object_trees=[get_object_tree(message)], clientapp_runtime_list=[1.0]))
        push_objects(get_all_nested_objects(message),
                     make_push_object_fn_protobuf(self.client.PushObject, self.node, run_id, response.session_id),
                     object_ids_to_push=set(response.objects_to_push))


def _instruction(log: Path, message_type: str, timeout: float = 300) -> tuple[int, str]:
    """(run id, message id) of the `message_type` message a SuperNode logged receiving."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run_id, kind, mid in RECEIVING.findall(log.read_text(errors="replace")):
            if kind == message_type:
                return int(run_id), mid
        time.sleep(0.1)
    raise AssertionError(f"no {message_type} message in {log}:\n{log.read_text(errors='replace')[-1500:]}")


def _sent(log: Path, count: int, timeout: float = 300) -> None:
    """Until the SuperNode logged its `count`-th reply sent."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count("Sent successfully") < count:
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-1500:]
        time.sleep(0.1)


def test_a_node_cannot_answer_as_another_node(tmp_path, corpora):
    run_dir = tmp_path / "run"
    a, b = make_centres(run_dir, corpora, 2)
    pki = make_pki(tmp_path / "pki", [a.name, b.name])
    cfg = one_round(run_dir, **{"data-plane": "flower"})  # weights inside Flower's reply: what a forger would send
    initial = pack({k: v.float() for k, v in build_model(cfg.model, seed=cfg.seed).state_dict().items()})
    forged_train = RecordDict({
        "centre": ConfigRecord({"name": a.name}), "arrays": ArrayRecord({"params": Array(initial)}),
        "metrics": MetricRecord({"tokens": token_cap(cfg), "train-loss": MARK, "eval-loss": MARK})})
    forged_eval = RecordDict({"centre": ConfigRecord({"name": a.name}),
                              "metrics": MetricRecord({"tokens": 1.0, "eval-loss": MARK})})
    with LocalFederation(run_dir, [a, b], base_port=free_base_port(8), pki=pki) as fed:
        ids = {c.name: node_id(fed.logs / f"supernode-{c.name}.log") for c in (a, b)}
        a_log = fed.logs / f"supernode-{a.name}.log"
        worker = next(p for p in fed.group.procs if p.name == f"worker {a.name}")
        through_gate = Forger(fed.superlink_address, pki.ca_cert, pki.private_key(b.name), ids[b.name])
        direct = Forger(f"127.0.0.1:{fed.superlink_internal_port}", pki.ca_cert, pki.private_key(b.name), ids[b.name])
        flwr_run = fed.submit(cfg.to_mapping())
        outcomes = {}
        # A's worker is held between its prepare reply and B's forgery, so that the forgery comes first.
        _sent(a_log, 1)
        os.killpg(worker.popen.pid, signal.SIGSTOP)
        try:
            run_id, train_id = _instruction(a_log, "train")
            outcomes["gate-reply"] = _attempt(lambda: through_gate.reply_as(ids[a.name], run_id, train_id, "train",
                                                                             forged_train))
            outcomes["gate-instruction"] = _attempt(lambda: through_gate.instruct(ids[a.name], run_id, forged_train))
        finally:
            os.killpg(worker.popen.pid, signal.SIGCONT)
        _sent(a_log, 2)  # A's own train reply
        os.killpg(worker.popen.pid, signal.SIGSTOP)
        try:
            run_id, eval_id = _instruction(a_log, "evaluate")
            outcomes["direct-reply"] = _attempt(lambda: direct.reply_as(ids[a.name], run_id, eval_id, "evaluate",
                                                                        forged_eval))
        finally:
            os.killpg(worker.popen.pid, signal.SIGCONT)
        run = fed.wait(flwr_run, timeout=600)
        gate_log = (fed.logs / "fleetgate.log").read_text(errors="replace")
        a_text = a_log.read_text(errors="replace")

    assert run["status"] == "finished", run.get("message")
    # Through the gate: both forgeries refused (403), and named in the gate's log.
    assert "403" in outcomes["gate-reply"] and "403" in outcomes["gate-instruction"], outcomes
    assert (f"node {ids[b.name]} pushed a reply to message {train_id} claiming src_node_id {ids[a.name]}"
            in gate_log), gate_log[-2000:]
    assert f"node {ids[b.name]} pushed an instruction" in gate_log, gate_log[-2000:]
    assert a_text.count("Receiving: train message") == 1  # the injected instruction never reached A
    # Round 1 aggregated A's own update, not the forgery.
    assert run["rounds"][0]["replied"] == 2, run["rounds"][0]
    assert run["rounds"][0]["centres"][a.name]["train-loss"] != pytest.approx(MARK)
    # On the SuperLink's own port Flower accepts the forgery as A's: the reason the gate checks. (If this
    # fails, Flower now compares the pushing node with src_node_id: forged_push can go, see its docstring.)
    assert outcomes["direct-reply"] == "accepted", outcomes
    assert run["final"]["centres"][a.name]["eval-loss"] == pytest.approx(MARK)


def _attempt(push) -> str:
    try:
        push()
    except Exception as err:  # noqa: BLE001  (Flower's client raises its own error types per status)
        return f"refused: {err}"
    return "accepted"

