"""Red team, issue 19 threat 5: a centre's name comes from the key it registered, not from its reply.

Keys are made as deploy/centre-key.sh makes them (ECDSA P-384, OpenSSH public half, filed as CENTRE.pub
in the registry deploy/pki.sh fills); the SuperLink's record of a node's key is the PEM Flower's own
`public_key_to_bytes` stores at registration, and reaches the ServerApp as NodeInfo.public_key
(`grid.get_nodes()`). The attacks run through the real `federate` loop on the scripted grid of
tests/test_federate_loop.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from safetensors.torch import load_file

from models.config import ConfigError
from models.packing import pack
from server.app import federate
from server.identity import Registry
from server.liveness import Liveness
from server.metrics import ServerMetrics
from server.runlog import RunLog
from server.validation import token_cap
from tests.test_federate_loop import Grid as LoopGrid
from tests.test_federate_loop import _config, _initial, answer, pending
from tests.test_redteam_server import serverapp_identity  # noqa: F401  (autouse here too)

CENTRES = ("fr-genci", "de-lrz", "es-bsc")


def _key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP384R1()).public_key()


def _registry_dir(root: Path, keys: dict[str, ec.EllipticCurvePublicKey]) -> Path:
    """What deploy/pki.sh leaves in OUT/public: the CA certificate and each centre's OpenSSH key."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnot a key\n-----END CERTIFICATE-----\n")
    for name, key in keys.items():
        (root / f"{name}.pub").write_bytes(key.public_bytes(serialization.Encoding.OpenSSH,
                                                            serialization.PublicFormat.OpenSSH) + b" " + name.encode())
    return root


# ------------------------------------------------------------------- the registry
def test_the_registry_names_the_key_the_superlink_holds(tmp_path):
    keys = {c: _key() for c in CENTRES}
    registry = Registry.load(_registry_dir(tmp_path / "public", keys))
    assert registry.names() == sorted(CENTRES)  # ca.crt is not a key and is left alone
    for name, key in keys.items():  # Flower's own serialisation of the key it registered
        assert registry.name_of(public_key_to_bytes(key)) == name
    assert registry.name_of(public_key_to_bytes(_key())) is None  # someone else's key
    assert registry.name_of(b"") is None  # no node authentication: Flower stores no key
    pins = registry.pins([NodeInfo(node_id=7, public_key=public_key_to_bytes(keys["de-lrz"])),
                          NodeInfo(node_id=8, public_key=b"")])
    assert pins == {7: "de-lrz", 8: None}


@pytest.mark.parametrize(("files", "says"), [
    ({}, "no CENTRE.pub"),
    ({"fr-genci.pub": b"ssh-ed25519 garbage"}, "fr-genci.pub is not a centre's OpenSSH public key"),
    ({"bad name.pub": None}, "bad name.pub is not a centre's OpenSSH public key named CENTRE.pub"),
])
def test_a_bad_registry_is_refused_naming_the_file(tmp_path, files, says):
    root = _registry_dir(tmp_path / "public", {})
    for name, data in files.items():
        (root / name).write_bytes(data if data is not None else _key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ConfigError, match="centre-keys") as err:
        Registry.load(root)
    assert says in str(err.value)


def test_one_key_filed_under_two_names_is_refused(tmp_path):
    key = _key()
    with pytest.raises(ConfigError, match="same key as"):
        Registry.load(_registry_dir(tmp_path / "public", {"fr-genci": key, "de-lrz": key}))
    with pytest.raises(ConfigError, match="not a directory"):
        Registry.load(tmp_path / "absent")


def test_liveness_with_pins_takes_the_registered_name_only():
    live = Liveness()
    live.pin({1: "fr-genci", 2: None})
    assert live.name(1) == "fr-genci" and live.name(2) == "node-2"
    assert live.claim(1, "fr-genci") is None
    assert live.claim(1, "de-lrz")[0] == "name-not-registered"
    assert live.claim(2, "de-lrz")[0] == "unregistered-key"
    assert live.claim(3, "es-bsc")[0] == "unregistered-key"  # a node the SuperLink has not listed
    live.replied(1, "de-lrz")  # a claim never overrides a pin
    assert live.name(1) == "fr-genci"


# ------------------------------------------------------------------- the attack, through federate
class KeyedGrid(LoopGrid):
    """The scripted grid, with each node's registered key (as the SuperLink's GetNodes returns it) and
    the name each node's replies claim."""

    def __init__(self, weights: dict[int, np.ndarray], tokens: float, keys: dict[int, bytes],
                 claims: dict[int, str]):
        super().__init__(weights, tokens)
        self.keys, self.claims = keys, claims
        self.asked: set[int] = set()  # nodes any message was sent to

    def push_messages(self, messages: list[Message]) -> list[str]:
        messages = list(messages)
        self.asked |= {m.metadata.dst_node_id for m in messages}
        return super().push_messages(messages)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys[n]) for n in self.weights]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [answer(msg, self.claims[msg.metadata.dst_node_id], self.tokens, self.weights[msg.metadata.dst_node_id])
                for msg in pending(self, ids)]


def _federate(grid: KeyedGrid, cfg, run_dir: Path) -> tuple[np.ndarray, dict, ServerMetrics, dict]:
    """`federate` as the ServerApp runs it: the final model, run.json's content, the metrics, the result."""
    run_dir.mkdir()
    runlog, metrics = RunLog(run_dir, cfg.to_mapping()), ServerMetrics(cfg.run_name)
    result = federate(grid, cfg, run_dir, runlog, metrics)
    return pack(load_file(run_dir / "final_model.safetensors")), runlog.data, metrics, result


def test_a_node_claiming_another_centres_name_is_refused_and_the_run_goes_on(tmp_path):
    """Node 3 holds es-bsc's registered key and claims to be fr-genci (to take its place, or double its
    weight); node 4 has a valid SuperNode key of its own, registered at the SuperLink but in no centre's
    CENTRE.pub, and claims de-lrz. Both would send a planted model. Both are refused, named
    in run.json (node 4 is sent nothing at all), and the global model is the two honest centres' mean alone."""
    keys = {c: _key() for c in CENTRES}
    registry = _registry_dir(tmp_path / "public", keys)
    node_keys = {1: keys["fr-genci"], 2: keys["de-lrz"], 3: keys["es-bsc"], 4: _key()}
    start = _initial()
    rng = np.random.default_rng(2)
    honest = {n: (start - rng.standard_normal(start.size) * 1e-3).astype(np.float32) for n in (1, 2)}
    planted = np.full(start.size, 0.5, np.float32)
    cfg = _config(tmp_path / "run", **{"expected-centres": 4, "min-centres": 2, "centre-keys": str(registry)})
    grid = KeyedGrid({**honest, 3: planted, 4: planted}, token_cap(cfg),
                     {n: public_key_to_bytes(k) for n, k in node_keys.items()},
                     {1: "fr-genci", 2: "de-lrz", 3: "fr-genci", 4: "de-lrz"})
    final, run, metrics, result = _federate(grid, cfg, tmp_path / "run")
    record = run["rounds"][0]
    assert record["replied"] == 2 and sorted(record["centres"]) == ["de-lrz", "fr-genci"]
    failed = record["failed"]
    assert list(failed) == ["es-bsc (node 3)"]
    assert "replied as 'fr-genci', but its key is the one registered for 'es-bsc'" in failed["es-bsc (node 3)"]
    assert metrics.registry.get_sample_value("bridgepool_rejected_updates_total", {
        "run": cfg.run_name, "centre": "es-bsc", "reason": "name-not-registered"}) == 1
    assert grid.asked == {1, 2, 3}  # node 4 was never sent anything: not even the model
    assert [e["node"] for e in run["events"] if e["event"] == "unregistered-node"] == [4]  # named once
    assert set(result["centres"]) == {"fr-genci", "de-lrz"}  # the final evaluation is screened the same way
    pinned = [e for e in run["events"] if e["event"] == "centre-names"]
    assert pinned == [{**pinned[0], "pinned": True, "centres": sorted(CENTRES)}]
    np.testing.assert_allclose(final, (honest[1] + honest[2]) / 2, atol=1e-6)  # nothing planted


def test_without_a_registry_names_are_the_replies_and_that_is_recorded(tmp_path):
    """The plain local demo (no node authentication, no keys): today's rule, a node keeps its first claim,
    and run.json says names were not pinned."""
    start = _initial()
    weights = {n: start.copy() for n in (1, 2, 3)}
    cfg = _config(tmp_path / "run")
    assert cfg.centre_keys == ""
    grid = KeyedGrid(weights, token_cap(cfg), {n: b"" for n in weights}, {1: "fr-genci", 2: "de-lrz", 3: "es-bsc"})
    _, run, _, _ = _federate(grid, cfg, tmp_path / "run")
    assert run["rounds"][0]["replied"] == 3
    assert [e["pinned"] for e in run["events"] if e["event"] == "centre-names"] == [False]
