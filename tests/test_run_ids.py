"""Red team, issue 19 threat 4 (last part): a centre's state is keyed by the SuperLink's run id, not only by the
run-name the submitter chose (clients/runs.py). A second run reusing a finished run's run-name without resume is
refused at every centre before its app runs, named in the reply and the egress ledger, and the first run's state
is left byte for byte; a real resume (a new run id, resume = true) still finds it. A request from outside an
admitted task, or naming another task's run, is refused too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from clients.runs import BOOK_NAME, RunBook, RunRefused
from clients.worker import CentreWorker
from deploy.local import LocalFederation
from tests.conftest import free_base_port, make_centres
from tests.test_multinode import one_round


# ------------------------------------------------------------------ the book
def test_a_run_name_belongs_to_its_first_run_id_and_moves_only_on_resume(tmp_path):
    book = RunBook(tmp_path / BOOK_NAME)
    first = book.admit("victim", 7, resume=False)
    assert book.check(first, "victim") == 7
    assert book.admit("victim", 7, resume=False)  # the same run's next task
    with pytest.raises(RunRefused, match="run-name 'victim' holds the state of run 7 at this centre; run 8"):
        book.admit("victim", 8, resume=False)
    assert RunBook(tmp_path / BOOK_NAME).bound == {"victim": 7}  # on disk, as a restarted worker reads it
    assert (tmp_path / BOOK_NAME).stat().st_mode & 0o777 == 0o600
    resumed = book.admit("victim", 8, resume=True)
    assert book.check(resumed, "victim") == 8
    with pytest.raises(RunRefused, match="now holds the state of run 8, which resumed run 7"):
        book.check(first, "victim")  # the resumed run's old tasks reach it no more


def test_a_ticket_opens_only_its_own_run_and_only_while_its_task_runs(tmp_path):
    book = RunBook(tmp_path / BOOK_NAME)
    mine = book.admit("mine", 1, resume=False)
    book.admit("victim", 2, resume=False)
    with pytest.raises(RunRefused, match="names run-name 'victim', but its task is run 1's"):
        book.check(mine, "victim")
    for forged in (None, "", "0" * 32):
        with pytest.raises(RunRefused, match="no ticket of a task the centre's runtime admitted"):
            book.check(forged, "victim")
    book.release(mine)
    with pytest.raises(RunRefused, match="no ticket"):
        book.check(mine, "mine")


# ------------------------------------------------------------------ the worker
def test_the_worker_refuses_requests_outside_an_admitted_task_and_admits_only_for_the_runtime(tmp_path, corpora):
    worker = CentreWorker("fr-genci", corpora["fr-genci"], tmp_path / "state", run_ids=True)
    cfg = one_round(tmp_path / "run").to_mapping()
    with pytest.raises(RunRefused, match="not uid 65534's"):  # the app's user (--app-user nobody) at the socket
        worker.handle({"op": "admit", "run-id": 5, "run-config": cfg, "round": 0}, {}, peer=65534)
    with pytest.raises(RunRefused, match="no ticket"):
        worker.handle({"op": "prepare", "round": 0, "run-config": cfg}, {})
    head, _ = worker.handle({"op": "admit", "run-id": 5, "run-config": cfg, "round": 0, "reply-to": "prepare"}, {},
                            peer=0)
    assert worker.handle({"op": "prepare", "round": 0, "run-config": cfg, "ticket": head["ticket"]}, {})[0]["status"] \
        == "ok"
    with pytest.raises(RunRefused, match="holds the state of run 5"):
        worker.handle({"op": "admit", "run-id": 6, "run-config": cfg, "round": 0, "reply-to": "prepare"}, {}, peer=0)
    ledger = [json.loads(line) for line in (tmp_path / "state" / "egress-ledger.jsonl").read_text().splitlines()]
    refused = [e for e in ledger if e["verdict"] == "refused"]
    assert [(e["stage"], e["op"]) for e in refused] == [("run-id", "prepare"), ("run-id", "prepare")], refused
    assert "holds the state of run 5" in refused[1]["violations"][0]


# ------------------------------------------------------------------ a real Flower federation
def _state(centres) -> dict[str, str]:
    """Every file of every centre's state for the run, by SHA-256 (run-ids.json and the ledger excepted)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for c in centres for p in sorted((c.state_dir / "run").rglob("*")) if p.is_file()}


def test_a_second_run_reusing_a_run_name_is_refused_and_a_resume_still_works(tmp_path, corpora):
    run_dir = tmp_path / "run"  # run-name "run" (one_round: the run directory's name)
    centres = make_centres(run_dir, corpora, 2)
    with LocalFederation(run_dir, centres, base_port=free_base_port(4)) as fed:
        victim = fed.wait(fed.submit(one_round(run_dir).to_mapping()), timeout=600)
        assert victim["status"] == "finished", victim.get("message")
        before = _state(centres)
        assert any("inner-optim-round-0001" in p for p in before) and any("position.json" in p for p in before)

        # A new run (a new SuperLink run id) naming the victim's run-name, without resume.
        reuse = fed.wait(fed.submit(one_round(run_dir, rounds=2).to_mapping()), timeout=600)
        after = _state(centres)

        # The victim's run resumed (a new run id, resume = true): admitted, it finds round 1's state.
        resumed = fed.wait(fed.submit(one_round(run_dir, rounds=2, resume=True).to_mapping()), timeout=600)

    assert reuse["status"] == "failed"
    assert "before round 1, 2 of 2 centres could not start this run" in reuse["message"], reuse["message"]
    assert "run-name 'run' holds the state of run" in reuse["message"], reuse["message"]
    assert after == before  # nothing of the victim's state was written, loaded into another run, or deleted
    for c in centres:
        ledger = [json.loads(line) for line in (c.state_dir / "egress-ledger.jsonl").read_text().splitlines()]
        refused = [e for e in ledger if e["verdict"] == "refused"]
        assert refused and all(e["stage"] == "run-id" and e["run"] == "run" for e in refused), refused
    assert resumed["status"] == "finished", resumed.get("message")
    assert any(e["event"] == "resumed-from" and e["round"] == 1 for e in resumed["events"])
    # Round 2 only (the refused run rewrote the coordinator's run.json, which a resume extends), both centres.
    assert [(r["round"], r["replied"]) for r in resumed["rounds"]] == [(2, 2)], resumed["rounds"]
    assert Path(centres[0].state_dir / "run" / "position.json").exists()
