"""Red team, issue 19 threats 6 and 2, against the real worker process (`bridgepool centre serve`).

A client of the worker socket that connects and sends nothing, announces a huge frame, sends
garbage or leaves before its reply must be dropped with a log line while the worker keeps
serving; a request the centre's policy refuses comes back as an error reply naming it."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients import wire
from clients.data import prepare_centre
from clients.egress import read_ledger
from deploy.cli import main as cli_main
from models.config import RunConfig, load_defaults

READ_TIMEOUT = 1.0
LIMIT = 1_000_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One worker process for the module's tests (starting one costs seconds)."""
    tmp_path = tmp_path_factory.mktemp("served")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(f"Document {i}. " + "Some ordinary prose for a tiny model. " * 20)
    prepare_centre(str(docs), tmp_path / "data")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"read-timeout = {READ_TIMEOUT}\nmax-message-bytes = {LIMIT}\n")
    sock, log = tmp_path / "state" / "worker.sock", tmp_path / "worker.log"
    argv = [sys.executable, "-m", "deploy.cli", "centre", "serve", "--centre", "fr-genci", "--data-dir",
            str(tmp_path / "data"), "--state-dir", str(tmp_path / "state"), "--socket", str(sock),
            "--threads", "1", "--policy", str(policy)]
    with log.open("w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if wire.call(sock, {"op": "ping"}, timeout=30)[0]["status"] == "ok":
                    break
            except wire.WorkerError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "worker did not start: " + log.read_text()
            time.sleep(0.2)
        yield sock, log, tmp_path
    finally:
        proc.terminate()
        proc.wait(30)


def _raw(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    return s


def _ping(sock: Path) -> float:
    t0 = time.monotonic()
    assert wire.call(sock, {"op": "ping"}, timeout=30)[0] == {"status": "ok", "centre": "fr-genci"}
    return time.monotonic() - t0


def _wait_for(log: Path, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while log.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not in the worker log:\n{log.read_text()}"
        time.sleep(0.05)


def test_hostile_clients_are_dropped_and_the_worker_keeps_serving(served):
    sock, log, _ = served
    silent = _raw(sock)  # connects, sends nothing: holds the one-at-a-time loop until the read timeout
    waited = _ping(sock)
    assert READ_TIMEOUT * 0.5 < waited < READ_TIMEOUT + 20  # served after the silent one was cut off
    _wait_for(log, "dropped a client of the worker socket")
    silent.close()

    huge = _raw(sock)  # announces a 1 TiB frame: refused from the length prefix, nothing allocated
    huge.sendall(struct.pack("!i", -1) + struct.pack("!Q", 1 << 40))
    _wait_for(log, f"exceeds the limit of {LIMIT} bytes")
    huge.close()
    big = _raw(sock)  # a frame just over the limit (the body), after a valid header
    head = b'{"op": "ping"}'
    big.sendall(struct.pack("!i", len(head)) + head + struct.pack("!i", LIMIT + 1))
    _wait_for(log, f"exceeds the limit of {LIMIT} bytes", 2)
    big.close()

    garbage = _raw(sock)  # well-framed, but neither JSON nor safetensors
    garbage.sendall(struct.pack("!i", 4) + b"\xff\xfe\x00\x01" + struct.pack("!i", 3) + b"abc")
    _wait_for(log, "a malformed message")
    garbage.close()

    odd = _raw(sock)  # a run-config that is not a table (was an AttributeError ending the serve loop)
    head = b'{"op": "train", "round": 1, "run-config": [1, 2]}'
    odd.sendall(struct.pack("!i", len(head)) + head + struct.pack("!i", 0))
    _wait_for(log, "the request carries no run config")
    odd.close()

    leaver = _raw(sock)  # a whole request, then gone before the reply
    head = b'{"op": "ping"}'
    leaver.sendall(struct.pack("!i", len(head)) + head + struct.pack("!i", 0))
    leaver.close()
    assert _ping(sock) < 20  # still serving after all of them


def test_a_policy_refusal_reaches_the_client_and_the_ledger(served):
    sock, _, tmp_path = served
    oracle = RunConfig.from_mapping({**load_defaults(), "model": "tiny", "batch-size": 1, "seq-len": 1,
                                     "eval-batches": 1, "inner-steps": 1, "run-name": "oracle",
                                     "run-dir": str(tmp_path)}).to_mapping()
    with pytest.raises(wire.WorkerError, match="refused by the centre's policy: .*below the centre's minimum"):
        wire.call(sock, {"op": "evaluate", "round": 1, "run-config": oracle}, timeout=60)
    (entry,) = [e for e in read_ledger(tmp_path / "state" / "egress-ledger.jsonl") if e["run"] == "oracle"]
    assert (entry["verdict"], entry["stage"], entry["run"], entry["op"]) == ("refused", "policy", "oracle", "evaluate")
    _ping(sock)


def test_a_bad_policy_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "policy.toml"
    bad.write_text("min-tokens = 5\n")
    argv = ["centre", "serve", "--centre", "fr-genci", "--data-dir", str(tmp_path), "--state-dir",
            str(tmp_path / "s"), "--socket", str(tmp_path / "s" / "w.sock"), "--policy", str(bad)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bridgepool: error: policy file") and "unknown policy key(s) min-tokens" in err
    assert not os.path.exists(tmp_path / "s" / "w.sock")
