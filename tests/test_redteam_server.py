"""Red team, issue 19 threats 5 and 6, against the server's real round path.

Each attack is one centre's reply, delivered through the real `exchange` loop (a scripted
in-memory grid in place of the SuperLink) and screened by `_accept`, as `federate` does.
It must be rejected with a named reason, the run must go on, and the global model must be
exactly the one the honest replies alone give (nothing lost, nothing planted)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from models.config import RunConfig, load_defaults
from models.packing import INT8_KEY, PARAMS_KEY, SCALE_KEY, pack, quantize_int8, unpack
from server import messaging
from server.aggregation import OuterOptimizer, aggregate
from server.app import _accept, _round_record
from server.broadcast import Broadcast
from server.liveness import Liveness
from server.messaging import exchange
from server.validation import UpdateRejected, check_layout, read_record, token_cap

REFERENCE = {"wte": torch.zeros(6, 4), "ln.bias": torch.zeros(4), "head": torch.zeros(3, 4)}
SIZE = sum(t.numel() for t in REFERENCE.values())
CAP = 2.0 * 4 * 32  # inner-steps 2 x batch-size 4 x the tiny model's block size 32
HONEST = {"tokens": CAP, "train-loss": 3.0, "eval-loss": 3.1}

Reply = Callable[[int], RecordDict]


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """What Flower sets inside a ServerApp process, so Messages can be built here; fast polls."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    monkeypatch.setattr(messaging, "POLL_SECONDS", 0.01)


class Grid:
    """Every node answers at once with `replies[node](round)`."""

    def __init__(self, replies: dict[int, Reply]):
        self.replies, self.sent, self.pushed = replies, {}, 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid, self.pushed = f"m{self.pushed}", self.pushed + 1
            msg.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        out = []
        for mid in ids:
            msg = self.sent.pop(mid, None)
            if msg is not None:
                content = self.replies[msg.metadata.dst_node_id](int(msg.metadata.group_id))
                out.append(Message(content=content, reply_to=msg))
        return out


def _update(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(SIZE) * 0.01).astype(np.float32)


def _reply(name: str, arrays: dict | None = None, metrics: dict | None = None, seed: int = 0) -> Reply:
    def make(_rnd: int) -> RecordDict:
        a = arrays if arrays is not None else {PARAMS_KEY: Array(_update(seed))}
        return RecordDict({"arrays": ArrayRecord(a), "metrics": MetricRecord(metrics or dict(HONEST)),
                           "centre": ConfigRecord({"name": name})})
    return make


def _round(replies: dict[int, Reply], live: Liveness | None = None, rnd: int = 1):
    broadcast = Broadcast(np.zeros(SIZE, np.float32), "none")
    broadcast.advance(np.zeros(SIZE, np.float32))
    ex = exchange(Grid(replies), sorted(replies), "train", broadcast, rnd, timeout=5.0, liveness=live, quorum=1)
    accepted = _accept(ex, REFERENCE, 10.0, CAP)
    return ex, accepted


def _why(ex, centre: str) -> tuple[str, str]:
    """(reason code, message) of `centre`'s rejection, whether screened at collection (keyed
    'centre (node N)') or by validation (keyed by the centre's name)."""
    (key,) = [k for k, (c, _) in ex.codes.items() if c == centre]
    return ex.codes[key][1], ex.failures[key]


def _global(states: list[dict], tokens: list[float]) -> dict[str, torch.Tensor]:
    return aggregate(OuterOptimizer(REFERENCE, "diloco", 0.7, 0.9), states, tokens)


def _honest_alone() -> dict[str, torch.Tensor]:
    return _global([unpack(_update(1), REFERENCE)], [CAP])


def _assert_only_honest(ex, accepted) -> None:
    assert [r.centre for r in accepted] == ["fr-genci"]
    model = _global([r.state for r in accepted], [r.metrics["tokens"] for r in accepted])
    for k, v in _honest_alone().items():
        assert torch.equal(model[k], v), k
    record = _round_record(1, ex, accepted, 0.0, 0.0)  # the round is recorded, the run goes on
    assert record["replied"] == 1 and record["tokens"] == CAP


def test_the_token_cap_follows_the_rounds_config(tmp_path):
    cfg = RunConfig.from_mapping({**load_defaults(), "model": "tiny", "inner-steps": 2, "batch-size": 4,
                                  "run-dir": str(tmp_path)})
    assert token_cap(cfg) == CAP  # seq-len 0 = the model's block size (32)
    assert token_cap(cfg.replace(seq_len=8)) == 2 * 4 * 8


# ------------------------------------------------------------------- threat 5
@pytest.mark.parametrize("claim", [3e38, CAP + 1, float("inf"), float("nan"), 0.0, -1.0])
def test_a_reply_claiming_impossible_tokens_is_rejected_and_not_aggregated(claim):
    """With two centres nothing else screens it (a median of two says nothing): before issue 19
    a 3e38 claim took all of the mean's weight and planted its update in the global model."""
    planted = np.full(SIZE, 0.5, np.float32)
    ex, accepted = _round({1: _reply("fr-genci", seed=1),
                           2: _reply("de-lrz", {PARAMS_KEY: Array(planted)}, {**HONEST, "tokens": claim})})
    code = "tokens-over-cap" if np.isfinite(claim) and claim > CAP else "metrics"  # NaN, inf, <= 0: "metrics"
    assert _why(ex, "de-lrz")[0] == code and _why(ex, "de-lrz")[1].startswith(f"rejected ({code})")
    _assert_only_honest(ex, accepted)


def test_a_reply_claiming_exactly_the_cap_is_accepted():
    ex, accepted = _round({1: _reply("fr-genci", seed=1), 2: _reply("de-lrz", seed=2)})
    assert [r.centre for r in accepted] == ["de-lrz", "fr-genci"] and ex.failures == {}


def test_a_node_cannot_take_another_centres_name():
    live = Liveness()
    _round({1: _reply("fr-genci", seed=1), 2: _reply("de-lrz", seed=2)}, live)
    ex, accepted = _round({1: _reply("fr-genci", seed=1), 2: _reply("fr-genci", seed=2)}, live, rnd=2)
    code, why = _why(ex, "de-lrz")
    assert code == "name-changed" and "replied as 'fr-genci' but has been 'de-lrz'" in why
    assert live.name(2) == "de-lrz"  # the record keeps the first name
    _assert_only_honest(ex, accepted)


# ------------------------------------------------------------------- threat 6
@pytest.mark.parametrize("missing", ["train-loss", "eval-loss", "tokens"])
def test_a_reply_missing_a_metric_is_a_rejected_update_not_a_keyerror(missing):
    metrics = {k: v for k, v in HONEST.items() if k != missing}
    ex, accepted = _round({1: _reply("fr-genci", seed=1), 2: _reply("de-lrz", None, metrics, seed=2)})
    code, why = _why(ex, "de-lrz")
    assert code == "missing-metric" and f"'{missing}' is missing" in why
    _assert_only_honest(ex, accepted)


def test_a_metric_list_is_rejected_not_a_typeerror():
    ex, accepted = _round({1: _reply("fr-genci", seed=1),
                           2: _reply("de-lrz", None, {**HONEST, "train-loss": [1.0, 2.0]})})
    assert _why(ex, "de-lrz")[0] == "metrics"
    _assert_only_honest(ex, accepted)


def _big(declared: tuple[int, ...], values: int) -> Array:
    """An Array whose metadata declares `declared` float32 but whose bytes hold `values` values."""
    real = Array(np.zeros(values, np.float32))
    return Array(dtype="float32", shape=declared, stype=real.stype, data=real.data)


@pytest.mark.parametrize(("arrays", "code"), [
    ({PARAMS_KEY: _big((SIZE,), 200 * SIZE)}, "bytes"),  # honest metadata, 200 x the bytes
    ({PARAMS_KEY: Array(np.zeros(1_000_000, np.float32))}, "shape"),  # a huge array
    ({f"a{i}": Array(np.zeros(1, np.float32)) for i in range(500)}, "keys"),  # many arrays
    ({PARAMS_KEY: Array(np.zeros(SIZE, np.float64))}, "dtype"),
    ({PARAMS_KEY: Array(dtype="float32", shape=(SIZE,), stype="pickle", data=b"\x80" * (SIZE * 4 + 80))}, "malformed"),
    ({PARAMS_KEY: Array(dtype="float32", shape=(SIZE,), stype="numpy.ndarray", data=b"\x00" * (SIZE * 4 + 80))},
     "malformed"),
])
def test_an_oversized_or_malformed_record_is_rejected_before_conversion(arrays, code, monkeypatch):
    converted = []
    real = Array.numpy

    def spy(self):
        converted.append(len(self.data))
        return real(self)

    monkeypatch.setattr(Array, "numpy", spy)
    ex, accepted = _round({1: _reply("fr-genci", seed=1), 2: _reply("de-lrz", arrays, seed=2)})
    assert _why(ex, "de-lrz")[0] == code, ex.failures
    if code != "malformed":
        assert converted == [SIZE * 4 + 128]  # only the honest reply's array was ever converted
    _assert_only_honest(ex, accepted)


def test_a_lying_npy_header_is_caught_after_conversion():
    """The declared metadata says float32 (SIZE,), the .npy bytes inside say float64: Flower's
    numpy() follows the bytes, so the decoded array is checked again."""
    inner = Array(np.zeros(SIZE // 2, np.float64))
    lying = Array(dtype="float32", shape=(SIZE,), stype=inner.stype, data=inner.data)
    ex, accepted = _round({1: _reply("fr-genci", seed=1), 2: _reply("de-lrz", {PARAMS_KEY: lying})})
    assert _why(ex, "de-lrz")[0] in ("dtype", "shape")
    _assert_only_honest(ex, accepted)


def test_layout_check_both_sides_of_each_limit():
    n = 3000
    check_layout({PARAMS_KEY: ("float32", (n,), 4 * n)}, n)
    check_layout({INT8_KEY: ("int8", (n,), n), SCALE_KEY: ("float32", (3,), 12)}, n)
    check_layout({PARAMS_KEY: ("float32", (n,), 4 * n + 4096)}, n, header_max=4096)
    for layout, code in [({PARAMS_KEY: ("float32", (n,), 4 * n + 4097)}, "bytes"),
                         ({PARAMS_KEY: ("float32", (n,), 4 * n - 1)}, "bytes"),
                         ({PARAMS_KEY: ("float32", (n + 1,), 4 * n + 4)}, "shape"),
                         ({INT8_KEY: ("int8", (n,), n), SCALE_KEY: ("float32", (2,), 8)}, "shape"),
                         ({INT8_KEY: ("uint8", (n,), n), SCALE_KEY: ("float32", (3,), 12)}, "dtype"),
                         ({INT8_KEY: ("int8", (n,), n)}, "keys")]:
        with pytest.raises(UpdateRejected) as err:
            check_layout(layout, n, header_max=4096)
        assert err.value.reason == code, layout


def test_read_record_converts_an_honest_record():
    out = read_record(ArrayRecord({PARAMS_KEY: Array(_update(3))}), SIZE)
    assert np.array_equal(out[PARAMS_KEY], _update(3))


# ------------------------------------------------------- int8 uploads (issue 19 "Also")
def test_int8_upload_round_trips_through_validation():
    reference = {k: torch.randn_like(v) for k, v in REFERENCE.items()}
    new = {k: v + 0.01 * torch.randn_like(v) for k, v in reference.items()}
    q = quantize_int8(pack(reference) - pack(new))
    ex, accepted = _round({1: _reply("fr-genci", {k: Array(v) for k, v in q.items()})})
    (r,) = accepted
    from server.validation import decode_update

    decoded = decode_update(q, reference)
    step = float(np.abs(pack(reference) - pack(new)).max()) / 127  # one int8 step of the largest block
    for k in reference:
        assert torch.allclose(decoded[k], new[k], atol=step / 2 + 1e-6), k
    assert set(r.arrays) == {INT8_KEY, SCALE_KEY}


@pytest.mark.parametrize("kind", ["short", "uint8", "scales-short", "scales-nan", "scales-f64", "only-q"])
def test_int8_malformations_are_rejected(kind):
    q = quantize_int8(_update(4))
    if kind == "short":
        q[INT8_KEY] = q[INT8_KEY][:-1]
    elif kind == "uint8":
        q[INT8_KEY] = q[INT8_KEY].view(np.uint8)
    elif kind == "scales-short":
        q[SCALE_KEY] = np.zeros(0, np.float32)
    elif kind == "scales-nan":
        q[SCALE_KEY] = np.full_like(q[SCALE_KEY], np.nan)
    elif kind == "scales-f64":
        q[SCALE_KEY] = q[SCALE_KEY].astype(np.float64)
    elif kind == "only-q":
        del q[SCALE_KEY]
    ex, accepted = _round({1: _reply("fr-genci", seed=1), 2: _reply("de-lrz", {k: Array(v) for k, v in q.items()})})
    assert _why(ex, "de-lrz")[1].startswith("rejected")
    _assert_only_honest(ex, accepted)
