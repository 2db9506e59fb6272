"""Every spec in examples/ runs: a tiny model, 1-2 rounds, through `bridgepool run` (issue 18).

The own-corpora example also shows keep-metrics: after the run, Prometheus and the centres'
endpoints stay up (with the final figures) until Ctrl-C, and the run then exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from deploy.cli import main
from deploy.processes import descendants, free_base_port
from deploy.spec import load_spec
from models.config import APP_DIR

EXAMPLES = APP_DIR / "examples"
QUICK = ["--set", "model=tiny", "--set", "inner-steps=4", "--set", "eval-batches=2", "--set", "threads=1",
         "--set", "connect-timeout=120.0"]


def test_every_example_is_a_valid_spec():
    specs = sorted(EXAMPLES.glob("*.toml"))
    assert {p.name for p in specs} >= {"demo.toml", "own-jsonl.toml"}
    for path in specs:
        spec = load_spec(path)
        assert spec.centres and spec.deployment == "local", path


def test_demo_example_runs(short_tmp, capsys):
    """As root (CI), in a run directory others may traverse: bundles run as 'nobody' with no network by default."""
    base = free_base_port(8)
    run_dir = short_tmp / "demo"
    rc = main(["run", str(EXAMPLES / "demo.toml"), "--run-dir", str(run_dir), "--base-port", str(base),
               "--metrics-port", str(base + 5), "--max-bytes", "40000", "--set", "rounds=1", *QUICK])
    out = capsys.readouterr().out
    assert rc == 0, out
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and len(run["rounds"]) == 1
    assert set(run["rounds"][0]["centres"]) == {"fr-genci", "de-lrz", "es-bsc"}
    assert "residency verdict: pass" in out
    assert "submitted bundles run as nobody" in out  # deploy/appuser.py's default as root
    for name in ("fr-genci", "de-lrz", "es-bsc"):
        # as nobody, with no network of its own (clients/appnet.py's default as root)
        assert "as user nobody, no network" in (run_dir / "logs" / f"supernode-{name}.log").read_text(), name


def _query(url: str, expr: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def test_own_jsonl_example_runs_and_keeps_its_metrics_until_ctrl_c(tmp_path):
    base = free_base_port(9)
    run_dir = tmp_path / "licences"
    prom = base + 8
    argv = [sys.executable, "-m", "deploy.cli", "run", str(EXAMPLES / "own-jsonl.toml"), "--run-dir", str(run_dir),
            "--base-port", str(base), "--metrics-port", str(base + 4), "--prometheus-port", str(prom),
            "--keep-metrics", "--set", "rounds=2", *QUICK]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # until the run is over and the metrics are being kept
            lines.append(line)
            if "keeping the metrics up until Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "keeping the metrics up until Ctrl-C" in text, text
        run = json.loads((run_dir / "run.json").read_text())
        assert run["status"] == "finished" and len(run["rounds"]) == 2, run.get("message")
        assert run["config"]["outer-momentum"] == 0.0  # the example's plain outer SGD (FedAvg at outer-lr 1)
        assert set(run["rounds"][0]["centres"]) == {"copyleft", "permissive"}
        manifest = json.loads((run_dir / "centres" / "copyleft" / "data" / "manifest.json").read_text())
        assert manifest["source"].endswith("examples/corpora/copyleft-centre.jsonl")
        # What the run printed is there to open: Prometheus, with every token of the run, after the run.
        url = f"http://127.0.0.1:{prom}"
        rest = proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline()
        assert f"Prometheus: {url}" in rest, rest
        expected = sum(r["tokens"] for r in run["rounds"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = _query(url, "sum(bridgepool_tokens_total)")
            if got and float(got[0]["value"][1]) == expected:
                break
            time.sleep(1)
        assert got and float(got[0]["value"][1]) == expected, got
        server = _query(url, "max_over_time(bridgepool_federation_tokens_total[1h])")  # the ServerApp's, kept
        assert server and float(server[0]["value"][1]) == expected
        children = descendants([proc.pid])
        assert children  # the federation and Prometheus are still up
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 0
        assert "Ctrl-C: stopping every process the run started" in proc.stdout.read()
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
