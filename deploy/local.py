"""A real Flower federation on this machine: one SuperLink, and per centre a
worker and a SuperNode, each a separate OS process on loopback (Deployment
Engine, not simulation). Used by `bridgepool demo`, the tests and benchmarks.

Run directory layout (nothing is written outside it):
  RUN_DIR/run.json, final_model.safetensors, checkpoints/round-NNNN/, loss.png
  RUN_DIR/server/flwr-home/      FLWR_HOME of the SuperLink, ServerApp and `flwr run`
  RUN_DIR/centres/NAME/data/     the centre's own corpus (train/validation, Arrow)
  RUN_DIR/centres/NAME/state/    inner-optimiser state, worker socket, FLWR_HOME
  RUN_DIR/logs/                  one log per process
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.processes import LaunchError, ProcessGroup, check_port_free, port_open, venv_bin, wait_for
from models.config import APP_DIR


@dataclass(frozen=True)
class Centre:
    name: str
    data_dir: Path
    state_dir: Path

    @property
    def socket(self) -> Path:
        return self.state_dir / "worker.sock"


def centre_dirs(run_dir: Path, name: str) -> Centre:
    root = run_dir / "centres" / name
    return Centre(name, root / "data", root / "state")


class LocalFederation:
    """Context manager: start everything on enter, stop everything on exit."""

    def __init__(self, run_dir: Path, centres: list[Centre], base_port: int = 9200,
                 threads_per_centre: int = 0):
        self.run_dir, self.centres = Path(run_dir).resolve(), centres
        self.superlink_port = base_port
        self.group = ProcessGroup()
        self.threads = threads_per_centre
        self.logs = self.run_dir / "logs"
        self.server_home = self.run_dir / "server" / "flwr-home"

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.group.stop_all()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.group.stop_all()

    def start(self) -> None:
        ports = {self.superlink_port: "SuperLink"}
        ports.update({self.superlink_port + 1 + i: f"SuperNode runtime API of {c.name}"
                      for i, c in enumerate(self.centres)})
        for port, what in ports.items():
            check_port_free(port, what)
        for c in self.centres:
            c.state_dir.mkdir(parents=True, exist_ok=True)
            self.group.start(f"worker {c.name}", self._worker_argv(c), self.logs / f"worker-{c.name}.log",
                             self._env(c.state_dir / "flwr-home"))
        self.server_home.mkdir(parents=True, exist_ok=True)
        self.group.start("SuperLink", [
            venv_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.superlink_port),
            "--database", str(self.run_dir / "server" / "superlink.db"),
        ], self.logs / "superlink.log", self._env(self.server_home))
        wait_for(lambda: all(c.socket.exists() for c in self.centres), 180, "centre workers", self.group)
        wait_for(lambda: port_open(self.superlink_port), 60, "the SuperLink", self.group)
        for i, c in enumerate(self.centres):
            node_config = f'centre="{c.name}" worker-socket="{c.socket}"'
            self.group.start(f"SuperNode {c.name}", [
                venv_bin("flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{self.superlink_port}",
                "--port", str(self.superlink_port + 1 + i), "--node-config", node_config,
            ], self.logs / f"supernode-{c.name}.log", self._env(c.state_dir / "flwr-home"))
        self._write_cli_config()

    # ----------------------------------------------------------------- runs
    def submit(self, run_config: dict[str, Any]) -> subprocess.Popen:
        """`flwr run APP_DIR bridgepool --stream`: returns the process; it exits when the run ends."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        argv = [venv_bin("flwr"), "run", str(APP_DIR), "bridgepool", "--stream", "--run-config", overrides]
        proc = self.group.start("flwr run", argv, self.logs / "flwr-run.log", self._env(self.server_home),
                                cwd=self.run_dir)
        return proc.popen

    def wait(self, flwr_run: subprocess.Popen, on_tick=None, timeout: float = 24 * 3600) -> dict:
        """Poll until the run ends; `on_tick(run_json)` drives the live view."""
        deadline = time.monotonic() + timeout
        run_json = self.run_dir / "run.json"
        while True:
            data = _read_json(run_json)
            if on_tick is not None:
                on_tick(data)
            if data.get("status") in ("finished", "failed"):
                return data
            if flwr_run.poll() is not None:
                time.sleep(0.5)
                data = _read_json(run_json)
                if data.get("status") in ("finished", "failed"):
                    return data
                raise LaunchError(self._why_no_result())
            for proc in self.group.procs:
                if proc.name != "flwr run" and not proc.alive():
                    raise LaunchError(f"{proc.name} exited with code {proc.popen.returncode}; "
                                      f"last lines of {proc.log}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"run did not finish within {timeout:.0f}s")
            time.sleep(0.5)

    # -------------------------------------------------------------- helpers
    def _why_no_result(self) -> str:
        log = self.logs / "flwr-run.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.exists() else ""
        silent = [c.name for c in self.centres
                  if "SuperNode ID" not in _read(self.logs / f"supernode-{c.name}.log")]
        hint = f"\ncentres whose SuperNode never connected: {', '.join(silent)}" if silent else ""
        return f"the run ended without a result; last lines of {log}:\n{tail}{hint}"

    def _worker_argv(self, c: Centre) -> list[str]:
        argv = [sys.executable, "-m", "deploy.cli", "centre", "serve", "--centre", c.name,
                "--data-dir", str(c.data_dir), "--state-dir", str(c.state_dir), "--socket", str(c.socket),
                "--nice", "5"]  # all centres share this machine with the control plane
        if self.threads:
            argv += ["--threads", str(self.threads)]
        return argv

    def _env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({"FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(APP_DIR) + os.pathsep + env.get("PYTHONPATH", ""),
                    "FLWR_TELEMETRY_ENABLED": "0",
                    # Flower's SuperExec polls for new ClientApp/ServerApp tasks every 1 s by
                    # default; 0.5 s halves that share of the per-round fixed cost without load.
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                    "MPLCONFIGDIR": str(self.run_dir / "server" / "mpl")})
        return env

    def _write_cli_config(self) -> None:
        (self.server_home / "config.toml").write_text(
            '[superlink]\ndefault = "bridgepool"\n\n[superlink.bridgepool]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n')


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


__all__ = ["Centre", "LocalFederation", "LaunchError", "centre_dirs", "shlex"]
