"""`bridgepool audit` (deploy/audit.py) on hand-made run directories: verdicts, DP, no content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clients.egress import EgressBlocked, EgressGuard, describe
from clients.weights import wire_manifest
from deploy.audit import audit, write_report
from deploy.cli import main
from models.gpt import build_model, parameter_manifest
from models.packing import PARAMS_KEY

MANIFEST = wire_manifest(parameter_manifest(build_model("tiny", seed=0)))
N = MANIFEST[PARAMS_KEY][0][0]
SOURCE = "/data/hospital-x/patients.jsonl"  # a path the report must not repeat


def _message(**extra) -> dict:
    return describe({"arrays": ("ArrayRecord", {PARAMS_KEY: np.zeros(N, np.float32)}),
                     "metrics": ("MetricRecord", {"train-loss": 2.0, "tokens": 96.0}),
                     "centre": ("ConfigRecord", {"name": "fr-genci"}), **extra})


def _run_dir(tmp_path: Path, rounds: int = 2, dp: dict | None = None, server_rounds: int | None = None) -> Path:
    run_dir = tmp_path / "run"
    data = run_dir / "centres" / "fr-genci" / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({
        "format": "bridgepool-text/1", "source": SOURCE, "tokenizer": "utf-8 bytes (vocab 256)",
        "splits": {"train": {"documents": 9, "bytes": 900, "tokens": 916, "sha256": "ab" * 32},
                   "validation": {"documents": 1, "bytes": 90, "tokens": 90, "sha256": "cd" * 32}}}))
    guard = EgressGuard("fr-genci", run_dir / "centres" / "fr-genci" / "state" / "egress-ledger.jsonl")
    for rnd in range(1, rounds + 1):
        for stage in ("worker-reply", "flower-reply"):
            guard.check(_message(), MANIFEST, run="r", round=rnd, op="train", stage=stage)
    config = {"run-name": "r", "model": "tiny", "dp-clip": 0.0, "dp-noise-multiplier": 0.0, "dp-delta": 1e-5,
              **(dp or {})}
    records = [{"round": r, "centres": {"fr-genci": {"bytes-sent": N * 4 + 134}}, **({"dp": {"epsilon": 3.0 * r}}
               if dp else {})} for r in range(1, (server_rounds or rounds) + 1)]
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "config": config, "rounds": records}))
    return run_dir


def test_a_clean_run_passes_and_reports_only_fingerprints(tmp_path):
    run_dir = _run_dir(tmp_path)
    js, md, report = write_report(run_dir)
    c = report["centres"]["fr-genci"]
    assert report["verdict"] == "pass" and c["verdict"] == "pass" and c["problems"] == []
    assert c["sent"] == {"messages": 2, "bytes": 2 * N * 4, "arrays": [f"params float32 ({N},)"],
                         "metrics": ["tokens", "train-loss"]}
    assert [r["round"] for r in c["rounds"]] == [1, 2] and c["rounds"][0]["server-recorded-bytes"] == N * 4 + 134
    assert c["data"]["splits"]["train"]["sha256"] == "ab" * 32
    for text in (js.read_text(), md.read_text()):
        assert SOURCE not in text and "hospital" not in text
    assert "gradient inversion" in md.read_text() and "unquantified" in md.read_text()


def test_blocked_attempts_are_reported_and_do_not_fail_the_centre(tmp_path):
    run_dir = _run_dir(tmp_path)
    guard = EgressGuard("fr-genci", run_dir / "centres" / "fr-genci" / "state" / "egress-ledger.jsonl")
    try:
        guard.check(_message(leak=("ConfigRecord", {"text": "secret"})), MANIFEST, run="r", round=2, op="train",
                    stage="flower-reply")
    except EgressBlocked:
        pass
    c = audit(run_dir)["centres"]["fr-genci"]
    assert c["blocked"]["count"] == 1 and c["blocked"]["rounds"] == [2] and c["verdict"] == "pass"
    assert "secret" not in json.dumps(c) and "leak" not in json.dumps(c["blocked"])


def test_a_reply_the_ledger_does_not_hold_fails_the_centre(tmp_path):
    run_dir = _run_dir(tmp_path, rounds=1, server_rounds=2)  # the server saw round 2, the ledger did not
    c = audit(run_dir)["centres"]["fr-genci"]
    assert c["verdict"] == "fail" and any("does not hold" in p for p in c["problems"])


def test_a_tampered_or_unchecked_ledger_fails_the_centre(tmp_path):
    run_dir = _run_dir(tmp_path)
    ledger = run_dir / "centres" / "fr-genci" / "state" / "egress-ledger.jsonl"
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[-1])
    entry["arrays"].append({"name": "sample", "dtype": "uint8", "shape": [512], "bytes": 512, "sha256": "0" * 64})
    lines[-1] = json.dumps(entry)
    lines.append(lines[0].replace('"round": 1', '"round": 3'))  # released by the worker, never checked after
    ledger.write_text("\n".join(lines) + "\n")
    problems = audit(run_dir)["centres"]["fr-genci"]["problems"]
    assert any("not the model's declared form" in p for p in problems)
    assert any("round 3 train" in p and "never checked" in p for p in problems)


def test_dp_epsilon_is_reported(tmp_path):
    run_dir = _run_dir(tmp_path, dp={"dp-clip": 1.0, "dp-noise-multiplier": 1.1})
    report = audit(run_dir)
    dp = report["differential-privacy"]
    assert dp["enabled"] and dp["epsilon"] == 6.0 and [r["epsilon"] for r in dp["epsilon-per-round"]] == [3.0, 6.0]
    assert "(6, 1e-05)-DP" in report["limits"][1] and "coordinator" in report["limits"][1]


def test_cli_audit_writes_both_files_and_exits_by_verdict(tmp_path):
    run_dir = _run_dir(tmp_path)
    assert main(["audit", str(run_dir)]) == 0
    assert (run_dir / "residency.json").exists() and (run_dir / "residency.md").exists()
    bad = _run_dir(tmp_path / "bad", rounds=1, server_rounds=2)
    assert main(["audit", str(bad)]) == 1
    assert main(["audit", str(tmp_path / "nowhere")]) == 2  # no run.json: a clear error, not a traceback


def test_a_run_that_failed_before_any_centre_sent_anything_is_no_traffic_not_fail(tmp_path, capsys):
    """Issue 18: nothing sent, nothing blocked is its own verdict; "fail" stays for unaccounted egress."""
    run_dir = _run_dir(tmp_path, rounds=0)
    (run_dir / "centres" / "fr-genci" / "state" / "egress-ledger.jsonl").unlink(missing_ok=True)  # no worker
    (run_dir / "centres" / "de-lrz" / "data").mkdir(parents=True)  # a centre with a ledger that stayed empty
    (run_dir / "centres" / "de-lrz" / "state").mkdir(parents=True)
    (run_dir / "centres" / "de-lrz" / "state" / "egress-ledger.jsonl").write_text("")
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "status": "failed", "message": "only 0 of 2 connected"}))
    js, md, report = write_report(run_dir)
    assert report["verdict"] == "no traffic"
    assert {n: c["verdict"] for n, c in report["centres"].items()} == {"fr-genci": "no traffic", "de-lrz": "no traffic"}
    assert all(c["problems"] == [] for c in report["centres"].values())
    assert "**Verdict: NO TRAFFIC**" in md.read_text()
    assert main(["audit", str(run_dir)]) == 0  # not a residency failure
    assert "residency verdict: no traffic" in capsys.readouterr().out
    # The same silent ledger with a reply the server recorded is unaccounted egress: still "fail".
    bad = _run_dir(tmp_path / "bad", rounds=0, server_rounds=1)
    assert audit(bad)["verdict"] == "fail"
