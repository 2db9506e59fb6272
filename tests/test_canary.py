"""Canary test (issue #5): planted data strings never leave a centre, and a leaking app is caught.

Every centre's corpus holds a unique canary in every document. A real federation
(SuperLink, SuperNodes and workers as OS processes on loopback, tiny model, 2
centres) runs while tcpdump captures all traffic on its ports; afterwards the
capture, the SuperLink database and the server's side of the run directory are
searched for each canary in every encoding deploy/canary.py knows.

The second test submits a deliberately leaking ClientApp (tests/leaky_clientapp.py):
fr-genci's leak goes through the egress guard, which must block it; de-lrz's skips
the guard, and the centre's runtime must withhold it (issue 19, threat 3): neither
reaches the capture.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file

from clients.egress import read_ledger
from deploy.audit import write_report
from deploy.canary import Capture, capture_haystacks, files_under, plant_canaries, search
from deploy.local import Centre, LocalFederation
from deploy.processes import free_base_port
from models.config import APP_DIR, RunConfig, load_defaults
from models.gpt import build_model
from models.packing import pack

CENTRES = ("fr-genci", "de-lrz")


def _centres(run_dir: Path, src: Path) -> tuple[list[Centre], dict[str, str]]:
    """Each centre's corpus: 30 small documents, each holding that centre's canary once."""
    return plant_canaries(run_dir, src, CENTRES)


def _config(run_dir: Path, rounds: int) -> RunConfig:
    return RunConfig.from_mapping({
        **load_defaults(), "model": "tiny", "rounds": rounds, "inner-steps": 3, "batch-size": 8,
        "inner-warmup-steps": 1, "expected-centres": 2, "threads": 1, "eval-batches": 2,
        "connect-timeout": 90.0, "round-timeout": 120.0, "run-dir": str(run_dir), "run-name": run_dir.name})


def _run_captured(run_dir: Path, centres: list[Centre], cfg: RunConfig, pcap: Path,
                  app_dir: Path = APP_DIR) -> tuple[dict, Capture]:
    base = free_base_port(2 + len(centres))  # SuperLink, SuperNodes, the ServerApp's data plane (deploy/local.py)
    with Capture(pcap, list(range(base, base + 2 + len(centres)))) as cap:
        with LocalFederation(run_dir, centres, base_port=base, durable_superlink=True) as fed:  # DB searched too
            run = fed.wait(fed.submit(cfg.to_mapping(), app_dir=app_dir), timeout=600)
    assert cap.dropped == 0, "tcpdump dropped packets: the capture is incomplete"
    return run, cap


def _server_side(run_dir: Path) -> dict[str, bytes]:
    """Everything in the run directory but the centres' own directories: the SuperLink
    database, checkpoints, run.json, logs, residency report."""
    return files_under(run_dir, exclude=[run_dir / "centres"])


def test_no_canary_leaves_a_centre(tmp_path):
    run_dir = tmp_path / "run"
    centres, canaries = _centres(run_dir, tmp_path / "src")
    # The canaries are there to find: in the centres' prepared data, in the plain encoding.
    for c in centres:
        assert {h.canary for h in search(files_under(c.data_dir), canaries)} == {c.name}

    run, _ = _run_captured(run_dir, centres, _config(run_dir, rounds=2), tmp_path / "capture.pcap")
    assert run["status"] == "finished", run.get("message")
    write_report(run_dir)  # the residency report is searched too

    hay, codings = capture_haystacks(tmp_path / "capture.pcap")
    assert codings == {"identity"}  # Flower 1.41 does not compress; a change must be looked at
    # The capture is not empty by accident: it holds the round-1 global model, byte for byte.
    ckpt = load_file(run_dir / "checkpoints" / "round-0001" / "model.safetensors")
    model_bytes = pack({k: ckpt[k] for k in build_model("tiny", seed=0).state_dict()}).tobytes()
    assert any(model_bytes in data for name, data in hay.items() if name.startswith("tcp"))
    assert (run_dir / "server" / "superlink.db").exists()

    assert search(hay, canaries) == []
    assert search(_server_side(run_dir), canaries) == []

    rep = json.loads((run_dir / "residency.json").read_text())
    assert rep["verdict"] == "pass", rep
    for name in CENTRES:
        c = rep["centres"][name]
        assert c["sent"]["messages"] == 4 and c["blocked"]["count"] == 0  # ready, 2 train, final evaluate
        allowed = {f"{k} {v['dtype']} {tuple(v['shape'])}" for k, v in rep["allowed"]["arrays"].items()}
        assert c["sent"]["arrays"] and set(c["sent"]["arrays"]) <= allowed


def test_leaking_clientapp_is_blocked_by_guard_and_by_runtime(tmp_path):
    run_dir = tmp_path / "run"
    centres, canaries = _centres(run_dir, tmp_path / "src")
    app_dir = _leaky_app(tmp_path / "leaky-app")

    run, _ = _run_captured(run_dir, centres, _config(run_dir, rounds=1), tmp_path / "capture.pcap", app_dir)
    assert run["status"] == "failed"  # no centre delivered a valid update
    write_report(run_dir)
    hay, _ = capture_haystacks(tmp_path / "capture.pcap")
    found = search(hay, canaries)

    # fr-genci: the guard blocked the leak, logged it, counted it; nothing of it reached the network.
    fr = centres[0]
    blocked = [e for e in read_ledger(fr.state_dir / "egress-ledger.jsonl") if e["verdict"] == "blocked"]
    assert [(e["stage"], e["round"], e["blocked-total"]) for e in blocked] == [("flower-reply", 1, 1)]
    assert any("not a parameter of the model" in v for v in blocked[0]["violations"])
    assert re.search(r"EGRESS BLOCKED \(flower-reply of train", (run_dir / "logs" / "worker-fr-genci.log").read_text())
    assert not [h for h in found if h.canary == "fr-genci"]
    assert not [h for h in search(_server_side(run_dir), canaries) if h.canary == "fr-genci"]

    # de-lrz: the same leak with the app's guard call skipped (issue 19, threat 3): the centre's runtime
    # finds that the reply is not the one its worker produced, withholds it, and sends an error of its own
    # words; the worker's ledger names it (stage runtime). Nothing of it reaches the network either.
    de = centres[1]
    withheld = [e for e in read_ledger(de.state_dir / "egress-ledger.jsonl") if e["verdict"] == "blocked"]
    assert [(e["stage"], e["round"], e["op"]) for e in withheld] == [("runtime", 1, "train")], withheld
    assert "a reply this worker did not produce" in withheld[0]["violations"][0]
    assert re.search(r"EGRESS BLOCKED at the runtime \(train", (run_dir / "logs" / "worker-de-lrz.log").read_text())
    assert not [h for h in found if h.canary == "de-lrz"], found
    assert not [h for h in search(_server_side(run_dir), canaries) if h.canary == "de-lrz"]
    assert "withheld a reply" in run["message"], run["message"]  # the runtime's words reached the server

    rep = (run_dir / "residency.json").read_text()
    report = json.loads(rep)
    assert report["centres"]["fr-genci"]["blocked"]["count"] == 1
    assert report["centres"]["de-lrz"]["blocked"]["count"] == 1
    assert canaries["fr-genci"] not in rep and canaries["de-lrz"] not in rep


def _leaky_app(app_dir: Path) -> Path:
    """A throwaway app bundle: bridgepool's pyproject with the leaking ClientApp as its client."""
    app_dir.mkdir()
    shutil.copy(Path(__file__).with_name("leaky_clientapp.py"), app_dir / "leaky_clientapp.py")
    text = (APP_DIR / "pyproject.toml").read_text()
    text, n = re.subn(r'clientapp = "clients\.app:app"', 'clientapp = "leaky_clientapp:app"', text)
    text, m = re.subn(r"(?m)^fab-include = \[.*\]$", 'fab-include = ["leaky_clientapp.py"]', text)
    assert n == 1 and m == 1, "pyproject.toml layout changed; update _leaky_app"
    (app_dir / "pyproject.toml").write_text(text)
    (app_dir / "README.md").write_text("Test-only leaking app (tests/test_canary.py).\n")
    return app_dir
