"""Red team, issue 19 threat 4: a run-name that walks out of the centre's state directory.

The run-name comes from whoever submits the run; the worker makes STATE_DIR/RUN_NAME and
writes, loads and deletes its inner-optimiser files there. Each attack below must be
refused before anything is written outside STATE_DIR, and the victim's files survive."""

from __future__ import annotations

import pytest

from clients.egress import read_ledger
from clients.policy import PolicyRefused
from clients.statefiles import StatePathError, inside, run_state_dir
from clients.training import CentreTrainer
from models.config import ConfigError, RunConfig, load_defaults

ATTACKS = ("../../de-lrz/state/victim", "/srv/elsewhere", "..", ".", "a/b", "run\x00x", "", "x" * 65,
           "../victim", "run name")


def _values(run_dir, name: str) -> dict:
    return {**load_defaults(), "model": "tiny", "rounds": 1, "inner-steps": 1, "batch-size": 2,
            "eval-batches": 1, "threads": 1, "device": "cpu", "run-dir": str(run_dir), "run-name": name}


@pytest.mark.parametrize("name", ATTACKS)
def test_runconfig_refuses_a_run_name_that_is_not_one_safe_component(tmp_path, name):
    with pytest.raises(ConfigError, match="run-name"):
        RunConfig.from_mapping(_values(tmp_path, name))


@pytest.mark.parametrize("name", ["bridgepool", "run-2026.12_01", "A" * 64, "..x", "x.."])
def test_runconfig_accepts_ordinary_run_names(tmp_path, name):
    assert RunConfig.from_mapping(_values(tmp_path, name)).run_name == name


def _victim(tmp_path):
    """Another centre's state (the local demo puts centres side by side) with a file to lose."""
    root = tmp_path / "fr-genci" / "state"
    victim = tmp_path / "de-lrz" / "state" / "victim"
    victim.mkdir(parents=True)
    (victim / "inner-optim-round-0001.pt").write_bytes(b"victim's optimiser state")
    root.mkdir(parents=True)
    return root, victim


@pytest.mark.parametrize("name", ["../../de-lrz/state/victim", "/srv/elsewhere", "..", "../victim"])
def test_the_trainer_path_helper_refuses_traversal_directly(tmp_path, name):
    root, victim = _victim(tmp_path)
    with pytest.raises((ConfigError, StatePathError)):
        run_state_dir(root, name)
    assert (victim / "inner-optim-round-0001.pt").read_bytes() == b"victim's optimiser state"


def test_a_symlinked_run_directory_pointing_elsewhere_is_refused(tmp_path):
    root, victim = _victim(tmp_path)
    (root / "innocent").symlink_to(victim, target_is_directory=True)
    with pytest.raises(StatePathError, match="outside the state directory"):
        run_state_dir(root, "innocent")
    with pytest.raises(StatePathError):
        inside(root, root / "innocent" / "inner-optim-round-0001.pt")
    assert inside(root, root / "ok" / "f.pt") == root / "ok" / "f.pt"


def test_a_trainer_built_around_validation_still_cannot_escape(tmp_path, corpora):
    """A config object forged past RunConfig's check (dataclasses.replace skips nothing, so
    object.__setattr__ on the frozen instance): the trainer's own check refuses it, nothing
    is created beside the victim."""
    root, victim = _victim(tmp_path)
    cfg = RunConfig.from_mapping(_values(tmp_path, "ok"))
    object.__setattr__(cfg, "run_name", "../../de-lrz/state/victim")
    with pytest.raises(ConfigError, match="run-name"):
        CentreTrainer("fr-genci", corpora["fr-genci"], root, cfg)
    assert sorted(p.name for p in victim.iterdir()) == ["inner-optim-round-0001.pt"]
    assert list(root.iterdir()) == []


def test_the_worker_refuses_a_traversing_run_and_keeps_serving(worker, tmp_path):
    """Through the worker's own request path (what a submitted ClientApp controls)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    bad = {**RunConfig.from_mapping(_values(tmp_path, "ok")).to_mapping(), "run-name": "../victim"}
    with pytest.raises(PolicyRefused, match="run-name"):  # the policy gate parses the config first
        worker.handle({"op": "prepare", "round": 0, "run-config": bad}, {})
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]
    (entry,) = read_ledger(worker.egress.ledger)
    assert entry["verdict"] == "refused" and "run-name" in entry["violations"][0]
    worker.gate.admit = lambda header: None  # past a gate that lets everything through: the trainer refuses
    with pytest.raises(ConfigError, match="run-name"):
        worker.handle({"op": "prepare", "round": 0, "run-config": bad}, {})
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]
    assert worker.handle({"op": "ping"}, {})[0]["status"] == "ok"
