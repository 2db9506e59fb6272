"""The Fleet gate (server/fleetgate.py, issue 19 threat 1): only /v1/fleet/... reaches the SuperLink."""

from __future__ import annotations

import httpx
import pytest
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import Message, Metadata
from flwr.proto.node_pb2 import Node
from starlette.testclient import TestClient

from server.fleetgate import MAX_BODY_BYTES, gate_app

SIGNED = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "flwr-timestamp": "2026-12-02T00:00:00+00:00"}


@pytest.fixture()
def seen() -> list[httpx.Request]:
    return []


@pytest.fixture()
def gate(seen):
    def superlink(request: httpx.Request) -> httpx.Response:  # stands in for the SuperLink on loopback
        seen.append(request)
        return httpx.Response(200, content=b"fleet:" + request.content, headers={"content-type": "application/x"})

    with TestClient(gate_app("http://127.0.0.1:1", transport=httpx.MockTransport(superlink))) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
                                  "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input", "/docs", "/",
                                  "/v1/fleet/../control/start-run", "/v1/fleetx/pull-messages"])
def test_every_path_but_fleet_is_refused_without_reaching_the_superlink(gate, seen, path):
    answer = gate.post(path, content=b"x", headers=SIGNED)
    assert answer.status_code in (403, 404), (path, answer.status_code)
    assert seen == []


def test_fleet_calls_pass_with_their_body_and_signature_headers(gate, seen):
    answer = gate.post("/v1/fleet/pull-messages", content=b"\x00\x01proto", headers=SIGNED)
    assert (answer.status_code, answer.content) == (200, b"fleet:\x00\x01proto")
    assert [r.url.path for r in seen] == ["/v1/fleet/pull-messages"]
    assert {k: seen[0].headers[k] for k in SIGNED} == SIGNED  # SuperNode authentication passes untouched


def test_oversized_requests_and_a_missing_superlink_are_answered_not_forwarded(seen):
    with TestClient(gate_app("http://127.0.0.1:1")) as down:  # nothing listens there
        assert down.post("/v1/fleet/pull-messages", content=b"x").status_code == 502
    def never(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    with TestClient(gate_app("http://127.0.0.1:1", transport=httpx.MockTransport(never))) as client:
        big = client.post("/v1/fleet/push-object", content=b"\0" * (MAX_BODY_BYTES + 1))
    assert big.status_code == 413 and seen == []


def _push(node: int, src: int, reply_to: str) -> bytes:
    message = Message(metadata=Metadata(src_node_id=src, dst_node_id=1, reply_to_message_id=reply_to))
    return PushMessagesRequest(node=Node(node_id=node), messages_list=[message]).SerializeToString()


@pytest.mark.parametrize(("body", "says"), [
    (_push(5, 6, "abc"), "node 5 pushed a reply to message abc claiming src_node_id 6"),
    (_push(5, 1, ""), "node 5 pushed an instruction"),
    (b"\xff\xff\xff", "not a PushMessagesRequest"),
])
def test_a_push_not_from_the_pushing_node_is_refused(gate, seen, body, says):
    answer = gate.post("/v1/fleet/push-messages", content=body, headers=SIGNED)
    assert answer.status_code == 403 and says in answer.text and seen == []


def test_a_nodes_own_reply_passes(gate, seen):
    assert gate.post("/v1/fleet/push-messages", content=_push(5, 5, "abc"), headers=SIGNED).status_code == 200
    assert len(seen) == 1
