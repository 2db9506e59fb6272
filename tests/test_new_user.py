"""Issue 18, "found when tried as a new user would": each case ends with `bridgepool: error: ...`
(exit 2) before anything starts, or, for what only a centre can tell, before round 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clients.data import prepare_centre
from clients.sources import DataSourceError
from deploy.cli import main
from deploy.local import LocalFederation, centre_dirs
from deploy.processes import descendants, free_base_port
from tests.test_federation import tiny_config


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    err = _fails(capsys, "demo", "--device", "cuda", "--centres", "1", "--run-dir", str(tmp_path / "r"))
    assert "bridgepool: error: device 'cuda' asked for (fr-genci) but torch sees no CUDA GPU" in err
    assert "--device cpu" in err
    assert not (tmp_path / "r").exists()  # nothing prepared, nothing started


def test_a_centre_that_cannot_prepare_ends_the_run_before_round_1_in_its_own_words(tmp_path):
    """The server's `prepare` (server/messaging.py): an error reply that leaves fewer centres than
    the quorum ends the run before round 1, quoting the centre, not round 1's quorum message."""
    run_dir = tmp_path / "run"
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):  # real prose, each document too short for one 32-token validation window
        (docs / f"{i}.txt").write_text(f"Short note {i}: too brief.")
    long_docs = tmp_path / "long"
    long_docs.mkdir()
    for i in range(6):
        (long_docs / f"{i}.txt").write_text(f"Document {i}. " + "Plain sentences of ordinary prose. " * 20)
    centres = [centre_dirs(run_dir, "fine"), centre_dirs(run_dir, "short")]
    prepare_centre(str(long_docs), centres[0].data_dir)
    prepare_centre(str(docs), centres[1].data_dir)
    cfg = tiny_config(run_dir, rounds=2)
    with LocalFederation(run_dir, centres, base_port=free_base_port(3)) as fed:
        run = fed.wait(fed.submit(cfg.to_mapping()), timeout=300)
        roots = [p.popen.pid for p in fed.group.procs]
    assert run["status"] == "failed" and run.get("rounds", []) == []
    message = run["message"]
    assert "before round 1, 1 of 2 centres could not start this run" in message, message
    assert ": centre worker failed: [short] token stream has 24 tokens, need at least seq_len + 2 = 34; " \
           "prepare more data or lower seq_len" in message, message  # the centre's words, unwrapped
    assert not descendants(roots)


def test_ports_out_of_range_or_overlapping_are_refused_up_front(tmp_path, capsys):
    err = _fails(capsys, "demo", "--base-port", "70000", "--run-dir", str(tmp_path / "r"))
    assert "bridgepool: error: --base-port 70000: the SuperLink, 3 SuperNode(s) and the data plane would use ports " \
           "70000-70004, but TCP ports are 1-65535; choose --base-port between 1024 and 65531" in err
    err = _fails(capsys, "demo", "--base-port", "65534", "--run-dir", str(tmp_path / "r"))
    assert "65534-65538" in err
    err = _fails(capsys, "demo", "--metrics-port", "9201", "--base-port", "9200", "--run-dir", str(tmp_path / "r"))
    assert "--base-port 9200 (ports 9200-9204) and --metrics-port 9201 (ports 9201-9204) overlap" in err
    err = _fails(capsys, "demo", "--metrics-port", "70000", "--run-dir", str(tmp_path / "r"))
    assert "--metrics-port 70000" in err
    assert not (tmp_path / "r").exists()


def test_a_taken_port_anywhere_in_the_range_is_named_before_data_is_prepared(tmp_path, capsys):
    base = free_base_port(8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 6))  # the last centre's metrics endpoint (base + 4 + 2)
        s.listen()
        err = _fails(capsys, "demo", "--centres", "2", "--base-port", str(base), "--metrics-port", str(base + 4),
                     "--run-dir", str(tmp_path / "r"))
    assert f"port {base + 6} (metrics endpoint of de-lrz) on 127.0.0.1 is already in use" in err
    with socket.socket() as s:  # the ServerApp's data plane, after the SuperNodes' ports
        s.bind(("127.0.0.1", base + 3))
        s.listen()
        err = _fails(capsys, "demo", "--centres", "2", "--base-port", str(base), "--metrics-port", str(base + 4),
                     "--run-dir", str(tmp_path / "r"))
    assert f"port {base + 3} (the ServerApp's data plane) on 127.0.0.1 is already in use" in err
    assert not (tmp_path / "r").exists()


def _mixed(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("A first document in plain English prose.\n")
    (docs / "b.txt").write_bytes("Caf\u00e9 cr\u00e8me, written in Latin-1 by an old editor.\n".encode("latin-1"))
    (docs / "c.txt").write_text("A third document, UTF-8 like the first.\n")
    return docs


def test_a_txt_that_is_not_utf8_is_named_and_the_choice_is_a_flag(tmp_path, capsys):
    docs = _mixed(tmp_path)
    with pytest.raises(DataSourceError, match=r"b\.txt: not UTF-8 text .*--undecodable skip"):
        prepare_centre(str(docs), tmp_path / "stop")
    err = _fails(capsys, "data", "prepare", "--out", str(tmp_path / "cli"), "--source", str(docs))
    assert f"bridgepool: error: {docs / 'b.txt'}: not UTF-8 text" in err
    assert main(["data", "prepare", "--out", str(tmp_path / "skip"), "--source", str(docs),
                 "--undecodable", "skip"]) == 0
    assert "skipped 1 file(s) that are not UTF-8" in capsys.readouterr().out
    manifest = (tmp_path / "skip" / "manifest.json").read_text()
    assert '"skipped-undecodable-files": 1' in manifest and "b.txt" not in manifest  # a count, never a name


def test_hf_source_not_cached_with_the_hub_unreachable_says_exactly_that(tmp_path):
    """A closed local port stands for the Hub (HF_ENDPOINT): refused at once, like a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed}", HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "data", "prepare", "--out", str(tmp_path / "out"),
                           "--source", "hf:nobody/not-cached"], capture_output=True, text=True, env=env, timeout=120)
    print(f"\nhf: not cached, Hub unreachable: exit {done.returncode} after {time.monotonic() - t0:.1f}s")
    assert done.returncode == 2, done.stderr
    assert "bridgepool: error: source 'hf:nobody/not-cached': not in the local Hugging Face cache" in done.stderr
    assert f"the Hub is unreachable (http://127.0.0.1:{closed}:" in done.stderr
    assert "Traceback" not in done.stderr
    env.update(HF_HUB_OFFLINE="1")  # offline mode asked for: no attempt at all, and it says why
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "data", "prepare", "--out", str(tmp_path / "out"),
                           "--source", "hf:nobody/not-cached"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "offline mode is set (HF_HUB_OFFLINE" in done.stderr, done.stderr
