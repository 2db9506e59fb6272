"""Resume really resumes mid-run (issue 19, "tests that could not fail"), on the server's real round loop
(`server.app.federate`) with the scripted grid of tests/test_federate_loop.py.

tests/test_federation.py's resume test compares run.json's round numbers and the final model with an
unbroken run. Neither can tell a resume from a silent restart at round 1: run.json replaces the rounds a
later run records (server/runlog.py), and centres that train deterministically give the unbroken run's
final model again when everything starts over. Here each centre's update depends on the model it is sent
and the round, the outer optimiser has momentum, and what is checked is what the resumed server does:
the rounds it asks the centres for, the model it sends first (bit-equal to round k's checkpoint), the
outer optimiser state it restores (key by key, against the checkpoint and the unbroken run), and every
later checkpoint and the final model bit-equal to the unbroken run's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from safetensors.torch import load_file

from models.packing import FORM_KEY, PARAMS_KEY, SEED, pack
from server.app import federate, start_point
from server.checkpoint import load_checkpoint
from server.runlog import RunLog
from server.validation import token_cap
from tests.test_federate_loop import _config, _initial, answer, pending
from tests.test_redteam_server import Grid as ScriptedGrid
from tests.test_redteam_server import serverapp_identity  # noqa: F401  (autouse here too)

NAMES = {1: "fr-genci", 2: "de-lrz", 3: "es-bsc"}
ROUNDS, KILLED_AFTER = 4, 2


class Killed(Exception):
    """The coordinator's process dies (here: the moment it would push round KILLED_AFTER + 1)."""


class Centres(ScriptedGrid):
    """Three centres that train deterministically from what they are sent: new = model - 1e-3 x a step
    drawn from (node, round), so the run's result depends on every model the server sends."""

    def __init__(self, tokens: float, kill_at: int = 0):
        super().__init__({})
        self.tokens, self.kill_at = tokens, kill_at
        self.rounds: list[int] = []  # the train rounds the server asked for, in order
        self.sent_models: dict[int, np.ndarray] = {}  # round -> the model the centres were sent

    def get_node_ids(self) -> list[int]:
        return list(NAMES)

    def push_messages(self, messages: list[Message]) -> list[str]:
        messages = list(messages)
        train = {int(m.metadata.group_id) for m in messages if m.metadata.message_type == "train"}
        if self.kill_at in train:
            raise Killed(f"killed before round {self.kill_at}")
        self.rounds += sorted(train - set(self.rounds))
        return super().push_messages(messages)

    def pull_messages(self, ids: list[str]) -> list[Message]:
        out = []
        for msg in pending(self, ids):
            node, model = msg.metadata.dst_node_id, None
            if msg.metadata.message_type == "train":
                rnd = int(msg.metadata.group_id)
                seed_only = msg.content["config"][FORM_KEY] == SEED  # round 1: built from the run's seed
                model = _initial() if seed_only else msg.content["arrays"][PARAMS_KEY].numpy()
                self.sent_models.setdefault(rnd, model.copy())
                step = np.random.default_rng(100 * rnd + node).standard_normal(model.size).astype(np.float32)
                model = model - 1e-3 * step
            out.append(answer(msg, NAMES[node], self.tokens, model))
        return out

def _federate(grid: Centres, run_dir: Path, resume: bool = False) -> dict:
    cfg = _config(run_dir, **{"rounds": ROUNDS, "outer-lr": 0.7, "outer-momentum": 0.9, "resume": resume})
    run_dir.mkdir(parents=True, exist_ok=True)
    runlog = RunLog(run_dir, cfg.to_mapping(), resume=resume)
    federate(grid, cfg, run_dir, runlog)
    return runlog.data


def _ckpt(run_dir: Path, rnd: int):
    return load_checkpoint(run_dir / "checkpoints" / f"round-{rnd:04d}")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


def test_a_run_killed_after_round_k_resumes_at_k_plus_1_bit_identical(tmp_path):
    tokens = token_cap(_config(tmp_path / "cap"))
    ref_dir = tmp_path / "unbroken"
    unbroken = Centres(tokens)
    _federate(unbroken, ref_dir)
    assert unbroken.rounds == [1, 2, 3, 4]

    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        _federate(Centres(tokens, kill_at=KILLED_AFTER + 1), run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round-*")) == ["round-0001", "round-0002"]
    saved = _ckpt(run_dir, KILLED_AFTER)

    # The outer optimiser state the resumed run starts from: every parameter's momentum, key by key,
    # equal to the checkpoint's and to the unbroken run's after the same round (not empty, not zero).
    cfg = _config(run_dir, **{"rounds": ROUNDS, "outer-lr": 0.7, "outer-momentum": 0.9, "resume": True})
    (tmp_path / "probe").mkdir()  # start_point's events go to a run.json of their own, not the resumed run's
    outer, first, _ = start_point(cfg, run_dir, RunLog(tmp_path / "probe", cfg.to_mapping()))
    assert first == KILLED_AFTER + 1
    restored = outer.optimizer_state()
    assert restored.keys() == outer.params.keys() and all(v.abs().sum() > 0 for v in restored.values())
    _same(restored, saved.outer, "restored momentum vs the checkpoint")
    _same(restored, _ckpt(ref_dir, KILLED_AFTER).outer, "restored momentum vs the unbroken run")
    _same(outer.weights(), saved.model, "restored weights vs the checkpoint")

    resumed = Centres(tokens)
    run = _federate(resumed, run_dir, resume=True)
    assert resumed.rounds == [3, 4]  # not 1, 2 again
    np.testing.assert_array_equal(resumed.sent_models[3], pack(saved.model))  # round 3 starts from round 2's model
    np.testing.assert_array_equal(resumed.sent_models[3], unbroken.sent_models[3])
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3, 4]
    assert [e["round"] for e in run["events"] if e["event"] == "resumed-from"] == [KILLED_AFTER]
    for rnd in (3, 4):  # every later round's weights and momentum, as if nothing had happened
        _same(_ckpt(run_dir, rnd).model, _ckpt(ref_dir, rnd).model, f"round {rnd} model")
        _same(_ckpt(run_dir, rnd).outer, _ckpt(ref_dir, rnd).outer, f"round {rnd} momentum")
    _same(load_file(run_dir / "final_model.safetensors"), load_file(ref_dir / "final_model.safetensors"),
          "final model")


def test_checkpoints_every_k_rounds_keep_the_newest_and_resume_from_one(tmp_path):
    """checkpoint-every = 2, checkpoint-keep = 1: rounds 2, 4 and the last (5) are checkpointed, only the
    newest stays on disk; a coordinator killed before round 4 resumes from round 2 (the newest it has),
    trains 3 again, and ends bit-equal to the unbroken run with the same cadence."""
    cadence = {"rounds": 5, "outer-lr": 0.7, "outer-momentum": 0.9, "checkpoint-every": 2, "checkpoint-keep": 1}
    tokens = token_cap(_config(tmp_path / "cap"))

    def run(grid: Centres, run_dir: Path, resume: bool = False) -> None:
        cfg = _config(run_dir, **{**cadence, "resume": resume})
        run_dir.mkdir(parents=True, exist_ok=True)
        federate(grid, cfg, run_dir, RunLog(run_dir, cfg.to_mapping(), resume=resume))

    ref_dir, run_dir = tmp_path / "unbroken", tmp_path / "killed"
    run(Centres(tokens), ref_dir)
    assert sorted(p.name for p in (ref_dir / "checkpoints").glob("round-*")) == ["round-0005"]
    with pytest.raises(Killed):
        run(Centres(tokens, kill_at=4), run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round-*")) == ["round-0002"]
    resumed = Centres(tokens)
    run(resumed, run_dir, resume=True)
    assert resumed.rounds == [3, 4, 5]  # round 3 ran before the kill, but had no checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round-*")) == ["round-0005"]
    _same(_ckpt(run_dir, 5).model, _ckpt(ref_dir, 5).model, "round 5 model")
    _same(_ckpt(run_dir, 5).outer, _ckpt(ref_dir, 5).outer, "round 5 momentum")
