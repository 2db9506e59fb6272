"""Bad input to `bridgepool demo` ends with a clear message and leaves nothing running."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from deploy.cli import main
from deploy.local import LaunchError, LocalFederation
from deploy.processes import descendants
from models.config import RunConfig, load_defaults
from tests.conftest import free_base_port, make_centres


def _demo(capsys, *args: str) -> str:
    assert main(["demo", *args]) == 2
    return capsys.readouterr().err


def test_unknown_model_names_the_choices(tmp_path, capsys):
    err = _demo(capsys, "--model", "gpt5", "--run-dir", str(tmp_path / "r"))
    assert "'model' must be one of tiny, small, base" in err
    assert not (tmp_path / "r").exists()  # rejected before anything was written


def test_invalid_config_value_names_the_key(tmp_path, capsys):
    err = _demo(capsys, "--set", "outer-momentum=1.5", "--run-dir", str(tmp_path / "r"))
    assert "outer-momentum" in err
    err = _demo(capsys, "--set", "inner-stpes=3", "--run-dir", str(tmp_path / "r"))
    assert "unknown config key(s) inner-stpes" in err


def test_too_many_centres(tmp_path, capsys):
    err = _demo(capsys, "--centres", "9", "--run-dir", str(tmp_path / "r"))
    assert "--centres must be between 1 and" in err


def test_port_in_use_names_the_port(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _demo(capsys, "--centres", "1", "--base-port", str(port), "--max-bytes", "20000",
                    "--run-dir", str(tmp_path / "r"))
    assert f"port {port} (SuperLink)" in err and "--base-port" in err


def test_missing_data_dir_names_the_centre_and_stops_everything(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 2)
    shutil.rmtree(centres[1].data_dir)
    fed = LocalFederation(run_dir, centres, base_port=free_base_port(4))
    with pytest.raises(LaunchError) as info:
        with fed:
            pass
    msg = str(info.value)
    assert "de-lrz" in msg and "bridgepool data prepare" in msg
    assert not fed.group.procs  # every started process was stopped


def test_centre_that_never_connects_fails_the_run_clearly(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 1)
    values = {**load_defaults(), "model": "tiny", "rounds": 1, "inner-steps": 2, "expected-centres": 2,
              "connect-timeout": 15.0, "run-dir": str(run_dir), "run-name": "r", "threads": 1}
    with LocalFederation(run_dir, centres, base_port=free_base_port(3)) as fed:
        run = fed.wait(fed.submit(RunConfig.from_mapping(values).to_mapping()), timeout=300)
        roots = [p.popen.pid for p in fed.group.procs]
    assert run["status"] == "failed"
    assert "only 1 of 2 centres connected within 15s" in run["message"]
    for pid in roots:  # the launcher's processes are gone, and nothing they spawned survives
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not descendants(roots)
