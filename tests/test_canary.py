"""Canary tests (issues #5, #16) on loopback, through the product command `bridgepool verify residency`.

The command plants a canary in every document it adds to each centre's corpus copy, runs a
real federation (SuperLink, SuperNodes and workers as OS processes on loopback, tiny model,
2 centres) while tcpdump captures all traffic on its ports, then searches the capture, the
SuperLink database and the coordinator's files for each canary in every encoding
deploy/residency/search.py knows, and writes the evidence bundle.

The second test verifies a deliberately leaking app bundle (tests/leaky_clientapp.py, `--app`):
fr-genci's leak goes through the egress guard, which must block it; de-lrz's skips the guard
and patches the runtime's check inside its bundle, and the centre's runtime must withhold it
(issue 19, threat 3). The netns test (tests/test_canary_netns.py) shows the search catching a
deliberate leak (`--leak-probe`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

from clients.egress import read_ledger
from deploy.cli import _parser, main
from deploy.residency.search import encodings, files_under, search
from models.config import APP_DIR

CENTRES = ("fr-genci", "de-lrz")


def _verify(out: Path, *flags: str) -> tuple[int, dict, Path]:
    """`bridgepool verify residency --topology loopback ... --out OUT`: exit code, report, run dir."""
    rc = main(["verify", "residency", "--topology", "loopback", "--max-bytes", "20000", "--out", str(out), *flags])
    report = json.loads((out / "report.json").read_text())
    return rc, report, out / report["run"]["name"]


def test_verify_residency_on_loopback_passes_and_leaves_a_bundle(short_tmp):
    given = "EVALUATOR-canary-7781-XQ"
    rc, rep, run_dir = _verify(short_tmp / "evidence", "--canary", given)
    assert (rc, rep["verdict"]) == (0, "PASS"), rep["verdict-reason"]
    assert rep["method"] == "loopback" and rep["run"]["status"] == "finished"
    assert rep["canaries"]["fr-genci"] == given and re.fullmatch(r"canary[0-9a-f]{24}", rep["canaries"]["de-lrz"])
    # The canaries are there to find: in each centre's prepared data, and only its own.
    for name in CENTRES:
        data = files_under(run_dir / "centres" / name / "data")
        assert {h.canary for h in search(data, rep["canaries"])} == {name}
    # The controls saw the traffic: the round-1 global model and the run's name are on the wire.
    assert rep["markers"]["round-1 global model bytes"]["found-in"] == ["lo"]
    assert rep["markers"]["run name"]["found-in"] == ["lo"]
    assert rep["content-encodings"] == ["identity"]  # Flower 1.41 does not compress; a change must be looked at
    assert rep["links"]["lo"]["dropped"] == 0 and rep["links"]["lo"]["frames"] > 100
    assert rep["problems"] == [] and rep["searches"]["capture"]["hits"] == []
    files = rep["searches"]["coordinator-files"]
    assert files["hits"] == [] and any(f.endswith("server/superlink.db") for f in files["files"])
    assert set(rep["encodings"]) == set(encodings(given)) and {"utf-16-le", "float16-le token ids"} <= set(
        rep["encodings"])

    # The bundle: three reports, hashes that match the files, the FAB the SuperLink ran.
    out = short_tmp / "evidence"
    assert sorted(Path(p).name for p in rep["files"]["reports"]) == ["report.html", "report.json", "report.md"]
    integ = rep["integrity"]
    cap = integ["captures"]["lo"]
    assert hashlib.sha256(Path(cap["path"]).read_bytes()).hexdigest() == cap["sha256"]
    assert integ["app-bundle"]["matches-run"] is True
    assert integ["code"]["sha256"] and integ["versions"]["flwr"] == "1.41.0"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "# Residency verification: PASS" in md and "gradient inversion" in md.lower()
    assert "Differential privacy was off" in md
    assert "<style>" in page and not re.search(r"<script|src=|href=", page)  # one self-contained page
    # Re-running: the recorded command parses with the product's own parser, same canaries and config.
    argv = shlex.split(rep["command"])
    assert argv[:3] == ["bridgepool", "verify", "residency"]
    again = _parser().parse_args(argv[1:])
    assert again.canary == [rep["canaries"][c] for c in CENTRES] and again.topology == "loopback"

    # The egress guard's own report for the same run (bridgepool audit), also searched above.
    guard = json.loads((run_dir / "residency.json").read_text())
    assert rep["guard"]["verdict"] == guard["verdict"] == "pass", guard
    allowed = {f"{k} {v['dtype']} {tuple(v['shape'])}" for k, v in guard["allowed"]["arrays"].items()}
    for name in CENTRES:
        c = guard["centres"][name]
        assert c["sent"]["messages"] == 3 and c["blocked"]["count"] == 0  # ready, train, final evaluate
        assert c["sent"]["arrays"] and set(c["sent"]["arrays"]) <= allowed


def test_verify_residency_of_a_leaking_app_finds_both_leaks_stopped(tmp_path, short_tmp):
    app_dir = _leaky_app(tmp_path / "leaky-app")
    rc, rep, run_dir = _verify(short_tmp / "evidence", "--app", str(app_dir))
    # Nothing of either leak is anywhere; but no centre delivered an update, so the run did not finish
    # and the proof says so rather than PASS.
    found = [h for s in rep["searches"].values() for h in s["hits"]]
    assert found == [], found
    assert (rc, rep["verdict"]) == (2, "INCONCLUSIVE") and "did not finish" in rep["verdict-reason"], rep
    assert rep["run"]["status"] == "failed"
    assert f"--app {app_dir}" in rep["command"]

    # fr-genci: the guard blocked the leak, logged it, counted it.
    blocked = [e for e in read_ledger(run_dir / "centres" / "fr-genci" / "state" / "egress-ledger.jsonl")
               if e["verdict"] == "blocked"]
    assert [(e["stage"], e["round"], e["blocked-total"]) for e in blocked] == [("flower-reply", 1, 1)]
    assert any("not a parameter of the model" in v for v in blocked[0]["violations"])
    assert re.search(r"EGRESS BLOCKED \(flower-reply of train", (run_dir / "logs" / "worker-fr-genci.log").read_text())

    # de-lrz: the same leak with the app's guard call skipped and the runtime's check patched in the bundle
    # (issue 19, threat 3): the runtime, in another process, finds the reply is not the one its worker
    # produced, withholds it and sends an error in its own words; the worker's ledger names it.
    withheld = [e for e in read_ledger(run_dir / "centres" / "de-lrz" / "state" / "egress-ledger.jsonl")
                if e["verdict"] == "blocked"]
    assert [(e["stage"], e["round"], e["op"]) for e in withheld] == [("runtime", 1, "train")], withheld
    assert "a reply this worker did not produce" in withheld[0]["violations"][0]
    assert re.search(r"EGRESS BLOCKED at the runtime \(train", (run_dir / "logs" / "worker-de-lrz.log").read_text())
    assert "withheld a reply" in rep["run"]["message"], rep["run"]["message"]

    guard = json.loads((run_dir / "residency.json").read_text())
    assert guard["centres"]["fr-genci"]["blocked"]["count"] == 1
    assert guard["centres"]["de-lrz"]["blocked"]["count"] == 1
    text = (run_dir / "residency.json").read_text()
    assert rep["canaries"]["fr-genci"] not in text and rep["canaries"]["de-lrz"] not in text


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


def test_verify_residency_refuses_bad_canaries_before_starting(tmp_path, capsys):
    base = ["verify", "residency", "--topology", "loopback", "--out", str(tmp_path / "evidence")]
    assert main([*base, "--canary", "short"]) == 2
    assert "--canary 'short': need one line of at least 12 UTF-8 bytes" in capsys.readouterr().err
    assert main([*base, "--canary", "a" * 20, "--canary", "b" * 20, "--canary", "c" * 20]) == 2
    assert "at most one per centre" in capsys.readouterr().err
    assert main([*base, "--centres", "1", "--leak-probe"]) == 2
    assert "--leak-probe needs at least 2 centres" in capsys.readouterr().err
    assert not (tmp_path / "evidence").exists()  # nothing started, nothing written
