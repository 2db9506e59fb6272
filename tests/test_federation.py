"""End to end on Flower's Deployment Engine: SuperLink, SuperNodes and centre
workers as separate OS processes on loopback, the tiny model, real man-page text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploy.local import LocalFederation
from models.config import RunConfig, load_defaults
from tests.conftest import free_base_port, make_centres, wait_for_checkpoint


def tiny_config(run_dir: Path, **over) -> RunConfig:
    values = {**load_defaults(), "model": "tiny", "rounds": 3, "inner-steps": 15, "batch-size": 8,
              "inner-lr": 1e-2, "inner-warmup-steps": 5, "expected-centres": 2, "threads": 1,
              "eval-batches": 4, "connect-timeout": 90.0, "round-timeout": 120.0,
              "run-dir": str(run_dir), "run-name": run_dir.name, **over}
    return RunConfig.from_mapping(values)


def run_federation(run_dir: Path, centres, cfg: RunConfig, stop_after_round: int | None = None) -> dict:
    with LocalFederation(run_dir, centres, base_port=free_base_port(2 + len(centres))) as fed:
        proc = fed.submit(cfg.to_mapping())

        def tick(run: dict) -> None:
            rounds = run.get("rounds", [])
            if stop_after_round and rounds and rounds[-1]["round"] >= stop_after_round:
                raise _Stop

        try:
            run = fed.wait(proc, on_tick=tick, timeout=600)
        except _Stop:
            wait_for_checkpoint(run_dir, stop_after_round)
            run = json.loads((run_dir / "run.json").read_text())
        pids = [p.popen.pid for p in fed.group.procs]
    for pid in pids:  # everything the launcher started is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    return run


class _Stop(Exception):
    pass


def test_two_centres_train_and_loss_goes_down(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 2)
    run = run_federation(run_dir, centres, tiny_config(run_dir))

    assert run["status"] == "finished", run.get("message")
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3]
    assert all(r["replied"] == 2 for r in run["rounds"])
    first = run["rounds"][0]["eval-loss-mean"]  # the untrained model, ~ln(256)
    final = run["final"]["eval-loss-mean"]
    assert first > 5.0
    assert final < first - 0.5, (first, final)
    assert set(run["final"]["centres"]) == {"fr-genci", "de-lrz"}
    for rnd in (1, 2, 3):
        assert (run_dir / "checkpoints" / f"round-{rnd:04d}" / "model.safetensors").exists()
    assert (run_dir / "final_model.safetensors").exists()
    for name in ("fr-genci", "de-lrz"):
        m = run["rounds"][-1]["centres"][name]
        assert m["tokens"] == 15 * 8 * 32 and m["tokens-per-second"] > 0
    # Each centre kept its inner optimiser state on its own disk.
    assert (centres[0].state_dir / run_dir.name / "inner-optim-round-0003.pt").exists()
    # Each worker built the model when asked to get ready, before round 1, and only then.
    for name in ("fr-genci", "de-lrz"):
        log = (run_dir / "logs" / f"worker-{name}.log").read_text()
        assert log.count("built tiny model") == 1 and log.index("prepare round 0") < log.index("train round 1"), log


def test_resume_continues_at_next_round_with_same_weights(tmp_path, corpora):
    # Unbroken reference run.
    ref_dir = tmp_path / "ref"
    ref = run_federation(ref_dir, make_centres(ref_dir, corpora, 2), tiny_config(ref_dir, rounds=4))
    assert ref["status"] == "finished"

    # Same run, stopped after round 2 (every process killed), then resumed.
    run_dir = tmp_path / "broken"
    centres = make_centres(run_dir, corpora, 2)
    cfg = tiny_config(run_dir, rounds=4)
    run_federation(run_dir, centres, cfg, stop_after_round=2)
    assert (run_dir / "checkpoints" / "round-0002").exists()
    resumed = run_federation(run_dir, centres, cfg.replace(resume=True))

    assert resumed["status"] == "finished", resumed.get("message")
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert any(e["event"] == "resumed-from" and e["round"] >= 2 for e in resumed["events"])
    a = load_file(ref_dir / "final_model.safetensors")
    b = load_file(run_dir / "final_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
