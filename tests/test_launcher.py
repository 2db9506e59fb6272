"""The local launcher's reaction to a process that dies during a run (stand-in processes, no
Flower): a centre is left to the server's quorum while min-centres still holds without it;
the SuperLink, a centre with every centre required, or a centre below the quorum stop the run."""

from __future__ import annotations

import json
import logging

import pytest

from deploy.local import Centre, LaunchError, LocalFederation

ALIVE, CRASH = ["sleep", "60"], ["sh", "-c", "echo 'Traceback: out of memory'; exit 3"]


def _federation(tmp_path, crashed: str, min_centres: int) -> tuple[LocalFederation, object]:
    """Three centres a, b, c and a SuperLink, all asleep except `crashed`, which has exited."""
    centres = [Centre(n, tmp_path / n / "data", tmp_path / n / "state") for n in "abc"]
    fed = LocalFederation(tmp_path / "run", centres)
    names = ["SuperLink"] + [f"{kind} {c.name}" for c in centres for kind in ("worker", "SuperNode")]
    for name in names:
        fed.group.start(name, CRASH if name == crashed else ALIVE, fed.logs / f"{name}.log", {})
    next(p for p in fed.group.procs if p.name == crashed).popen.wait(10)
    fed._min_centres = min_centres  # what submit() reads from the run config
    return fed, fed.group.start("flwr run", ALIVE, fed.logs / "flwr-run.log", {}).popen


def test_dead_centre_is_left_to_the_quorum(tmp_path, caplog):
    fed, flwr_run = _federation(tmp_path, "worker c", min_centres=2)

    def tick(_run: dict) -> None:  # the server closes its rounds without c and finishes
        if "c" in fed._stopped:
            (fed.run_dir / "run.json").write_text(json.dumps({"status": "finished", "finished": 1.0}))

    try:
        with caplog.at_level(logging.WARNING, logger="bridgepool.launcher"):
            assert fed.wait(flwr_run, on_tick=tick, timeout=30)["status"] == "finished"
        assert {p.name for p in fed._stopped["c"]} == {"worker c", "SuperNode c"}  # stopped with it
        # A second centre dies in the next run: 1 centre left, below min-centres = 2.
        fed._previous_end = 1.0  # that run.json is the previous run's
        fed.group.kill(["worker b"])
        fed.group.start("worker b", CRASH, fed.logs / "worker b.log", {}).popen.wait(10)
        with pytest.raises(LaunchError, match="centre b died: 1 centres left, below min-centres = 2"):
            fed.wait(flwr_run, timeout=30)
    finally:
        fed.group.stop_all()
    assert "centre c is down: worker c exited with code 3" in caplog.text and "out of memory" in caplog.text
    assert "goes on with 2 centres (min-centres = 2)" in caplog.text


@pytest.mark.parametrize(("crashed", "min_centres", "message"), [
    ("SuperLink", 2, "SuperLink exited with code 3"),
    ("SuperNode a", 0, "centre a died and min-centres = 0 (every centre) cannot be met"),
    ("worker a", 3, "centre a died: 2 centres left, below min-centres = 3"),
])
def test_dead_process_stops_the_run(tmp_path, crashed, min_centres, message):
    fed, flwr_run = _federation(tmp_path, crashed, min_centres)
    try:
        with pytest.raises(LaunchError, match="out of memory") as err:
            fed.wait(flwr_run, timeout=30)
    finally:
        fed.group.stop_all()
    assert message in str(err.value)
