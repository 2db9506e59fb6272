"""A real Flower federation on this machine: one SuperLink, and per centre a
worker and a SuperNode, each a separate OS process on loopback (Deployment
Engine, not simulation). Used by `bridgepool demo`, the tests and benchmarks.

Run directory layout (nothing is written outside it):
  RUN_DIR/run.json, final_model.safetensors, checkpoints/round-NNNN/, loss.png
  RUN_DIR/prometheus.yml         scrape config of the metrics endpoints (with metrics_port)
  RUN_DIR/server/flwr-home/      FLWR_HOME of the SuperLink, ServerApp and `flwr run`
  RUN_DIR/centres/NAME/data/     the centre's own corpus (train/validation, Arrow)
  RUN_DIR/centres/NAME/state/    inner-optimiser state, worker socket, FLWR_HOME
  RUN_DIR/logs/                  one log per process
"""

from __future__ import annotations

import grp
import hashlib
import json
import logging
import os
import pwd
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import commands
from deploy.commands import Pki
from deploy.processes import (
    LaunchError,
    Proc,
    ProcessGroup,
    check_port_free,
    free_base_port,
    port_open,
    venv_bin,
    wait_for,
)
from deploy.prometheus import scrape_config
from deploy.register import register_keys, supernode_refusal
from models.config import APP_DIR

log = logging.getLogger("bridgepool.launcher")
SOCKET_PATH_MAX = 100  # bytes; Linux allows 107 in sockaddr_un.sun_path


@dataclass(frozen=True)
class Centre:
    name: str
    data_dir: Path
    state_dir: Path
    device: str = ""  # this centre's worker: auto | cpu | cuda; "" = the run config's device
    threads: int = 0  # this centre's worker's torch threads; 0 = the federation's default
    nproc: int = 1  # the worker's data-parallel ranks (clients/ranks.py)
    shard: bool = False  # the model split over those ranks (FSDP, clients/shard.py)
    speed: float = 1.0  # < 1: an emulated slower centre (clients/training.py)

    @property
    def socket(self) -> Path:
        """The worker's socket: in its state directory, unless that path is longer than an AF_UNIX
        address may be (107 bytes; a deep run directory, such as pytest's), then in a directory of
        its own under the system's temporary directory, named after the state directory."""
        path = self.state_dir / "worker.sock"
        if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
            return path
        digest = hashlib.sha256(os.fsencode(self.state_dir.resolve())).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"bridgepool-{digest}" / "worker.sock"


def centre_dirs(run_dir: Path, name: str, device: str = "", threads: int = 0, nproc: int = 1,
                speed: float = 1.0, shard: bool = False) -> Centre:
    root = run_dir / "centres" / name
    return Centre(name, root / "data", root / "state", device, threads, nproc=nproc, shard=shard, speed=speed)


class LocalFederation:
    """Context manager: start everything on enter, stop everything on exit."""

    def __init__(self, run_dir: Path, centres: list[Centre], base_port: int = 9200,
                 threads_per_centre: int = 0, metrics_port: int = 0, pki: Pki | None = None,
                 warm_supernodes: bool = True, durable_superlink: bool | None = None, app_user: str | None = None):
        self.run_dir, self.centres = Path(run_dir).resolve(), centres
        # The SuperLink's state in RUN_DIR/server/superlink.db (SQLite) or in memory (Flower's
        # default). SQLite costs ~0.7 s of every round here (measured with trivial compute:
        # 1.6-2.3 s rounds against 0.8-1.0 s, on disk and on tmpfs alike), and the run's durable
        # record is its checkpoints and run.json. Kept on disk when it must outlive a SuperLink
        # restart: registered SuperNode keys (a Pki), or a caller that restarts the coordinator.
        self.durable = pki is not None if durable_superlink is None else durable_superlink
        self.warm = warm_supernodes  # False: stock flower-supernode, a new ClientApp process per message
        # Submitted bundles run as this user (root only): no access to data, state, ledger or keys; the
        # worker socket is 0660 for its group. None: as the launcher's user.
        self.app_user = app_user
        # With a Pki (deploy/pki.sh): HTTPS and SuperNode authentication, each centre's key registered
        # before its SuperNode starts. Without: plain HTTP on loopback, the explicit opt-in below.
        self.pki = pki
        self.superlink_port = base_port  # the Fleet gate's (server/fleetgate.py): what SuperNodes dial
        # The SuperLink itself (Fleet, Control and Runtime APIs on one port) listens on the coordinator's
        # loopback only, on a free port chosen at start (issue 19, threat 1).
        self.superlink_internal_port = 0
        # The ServerApp's data plane (server/dataplane.py): the port after the SuperNodes' runtime ports.
        self.data_plane_port = base_port + 1 + len(centres)
        self.metrics_port = metrics_port  # the server's; centre i uses metrics_port + 1 + i; 0 = no metrics
        self.group = ProcessGroup()
        self.threads = threads_per_centre
        self.logs = self.run_dir / "logs"
        self.server_home = self.run_dir / "server" / "flwr-home"
        self._stopped: dict[str, list[Proc]] = {}  # killed by kill_centre / kill_server, for restarts
        self._previous_end: float | None = None  # run.json's "finished" before the last submit (a resume)
        self._min_centres = 0  # the submitted run's quorum (min-centres); 0 = every centre

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
        ports[self.data_plane_port] = "the ServerApp's data plane"
        for port, what in ports.items():
            check_port_free(port, what)
        for who, port in self._metrics_ports().items():
            check_port_free(port, f"metrics endpoint of {who}", flag="--metrics-port")
        for c in self.centres:
            c.state_dir.mkdir(parents=True, exist_ok=True)
            self._spawn(c.name, f"worker {c.name}", self._worker_argv(c), self.logs / f"worker-{c.name}.log",
                        self._env(c.state_dir / "flwr-home"))
        self.server_home.mkdir(parents=True, exist_ok=True)
        self.superlink_internal_port = self._internal_port()
        self._write_cli_config()
        self._spawn("server", "SuperLink", commands.superlink(
            self.superlink_internal_port, str(self.run_dir / "server" / "superlink.db") if self.durable else None,
            self.pki, insecure=self.pki is None, host="127.0.0.1", exe=venv_bin("flower-superlink"),
        ), self.logs / "superlink.log", self._env(self.server_home))
        self._spawn("server", "Fleet gate", commands.fleet_gate(
            f"{self.superlink_host}:{self.superlink_port}", self.superlink_internal_port, self.pki,
            prog=(sys.executable,)), self.logs / "fleetgate.log", self._env(self.server_home))
        wait_for(lambda: all(c.socket.exists() for c in self.centres), 180, "centre workers", self.group)
        wait_for(self._superlink_up, 60, "the SuperLink", self.group)
        if self.pki is not None:
            self.register([self.pki.public_key(c.name) for c in self.centres])
        for i, c in enumerate(self.centres):
            self._spawn(c.name, f"SuperNode {c.name}", self.supernode_argv(c, self.superlink_port + 1 + i),
                        self.logs / f"supernode-{c.name}.log", self._env(c.state_dir / "flwr-home"))
        if self.metrics_port:
            (self.run_dir / "prometheus.yml").write_text(scrape_config(self.metrics_port, self.centre_metrics_ports()))

    # ----------------------------------------------------------------- runs
    def submit(self, run_config: dict[str, Any], app_dir: Path = APP_DIR) -> subprocess.Popen:
        """`flwr run APP_DIR bridgepool --stream`: returns the process; it exits when the run ends.
        `app_dir`: another app bundle's directory (the egress tests submit a leaking one)."""
        if self.metrics_port:  # the ServerApp serves where prometheus.yml points
            run_config = {**run_config, "metrics-port": self.metrics_port}
        run_config = {**run_config, **self.data_plane_config()}
        if self.pki is not None:  # node authentication on: each centre's name pinned to its key (server/identity.py)
            run_config = {**run_config, "centre-keys": self.pki.public_dir}
        self._previous_end = _read_json(self.run_dir / "run.json").get("finished")
        self._min_centres = int(run_config.get("min-centres") or 0)
        argv = commands.flwr_run(str(app_dir), run_config, exe=venv_bin("flwr"))
        proc = self._spawn("server", "flwr run", argv, self.logs / "flwr-run.log", self._env(self.server_home),
                           cwd=self.run_dir)
        return proc.popen

    def register(self, public_keys: list[str]) -> None:
        """`flwr supernode register` each centre's key at the SuperLink (SuperNode authentication)."""
        register_keys(public_keys, env=self._env(self.server_home), wrap=lambda argv: self._wrap("server", argv))

    def supernode_argv(self, c: Centre, runtime_port: int, **over: Any) -> list[str]:
        """Centre `c`'s SuperNode command line; `over` replaces arguments (the tests' refused variants)."""
        kwargs: dict[str, Any] = {"pki": self.pki, "insecure": self.pki is None, "warm": self.warm,
                                  "exe": venv_bin("flower-supernode"), "prog": (venv_bin("bridgepool"),),
                                  "app_user": self.app_user}
        return commands.supernode(c.name, self.superlink_address, str(c.socket), runtime_port, **{**kwargs, **over})

    def wait(self, flwr_run: subprocess.Popen, on_tick=None, timeout: float = 24 * 3600) -> dict:
        """Poll until the run ends; `on_tick(run_json)` drives the live view."""
        deadline = time.monotonic() + timeout
        run_json = self.run_dir / "run.json"
        while True:
            data = _read_json(run_json)
            if on_tick is not None:
                on_tick(data)
            if self._ended(data):
                return data
            if flwr_run.poll() is not None:
                time.sleep(0.5)
                data = _read_json(run_json)
                if self._ended(data):
                    return data
                raise LaunchError(self._why_no_result())
            for proc in list(self.group.procs):
                if proc.name != "flwr run" and proc in self.group.procs and not proc.alive():
                    self._process_died(proc)  # may stop (and remove) the centre's other process
            if time.monotonic() > deadline:
                raise LaunchError(f"run did not finish within {timeout:.0f}s")
            time.sleep(0.5)

    def _process_died(self, proc: Proc) -> None:
        """A process exited during a run. A centre's (worker or SuperNode) is left to the server's
        quorum logic when the quorum still holds without that centre: warn, stop the centre's other
        process (as `kill_centre`; `restart_centre` brings it back) and go on. Anything else
        (the SuperLink, a centre below the quorum or with every centre required) stops the run."""
        why = supernode_refusal(_read(proc.log)) if proc.name.startswith("SuperNode") else None
        what = (f"{proc.name} exited with code {proc.popen.returncode}{f' ({why})' if why else ''}; "
                f"last lines of {proc.log}:\n{proc.tail()}")
        centre = next((c.name for c in self.centres if proc.name in (f"worker {c.name}", f"SuperNode {c.name}")),
                      None)
        if centre is None:
            raise LaunchError(what)
        left = len(self.centres) - len({n for n in self._stopped if n != "server"} | {centre})
        if not self._min_centres:
            raise LaunchError(f"centre {centre} died and min-centres = 0 (every centre) cannot be met: {what}")
        if left < self._min_centres:
            raise LaunchError(f"centre {centre} died: {left} centres left, below min-centres = {self._min_centres}; "
                              f"resume from {self.run_dir / 'checkpoints'} once it is back: {what}")
        log.warning("centre %s is down: %s; the run goes on with %d centres (min-centres = %d), "
                    "the server closes rounds without it", centre, what, left, self._min_centres)
        self.kill_centre(centre)

    def _ended(self, run: dict) -> bool:
        """Finished or failed, and not the earlier run a resumed one was submitted after."""
        return run.get("status") in ("finished", "failed") and run.get("finished") != self._previous_end

    # --------------------------------------------------------------- faults
    # Crash and restart parts of the federation, as the fault tests and an operator's
    # drills need: SIGKILL (no goodbye to the SuperLink), then the same command lines.
    def kill_centre(self, name: str) -> None:
        """A centre dies: its SuperNode (with its ClientApp) and its worker are killed."""
        self._stopped[name] = self.group.kill([f"SuperNode {name}", f"worker {name}"])
        if not self._stopped[name]:
            raise LaunchError(f"centre {name} is not running")
        self._centre(name).socket.unlink(missing_ok=True)  # so a restart can wait for the new one

    def restart_centre(self, name: str, timeout: float = 180) -> None:
        """Start a killed centre's worker, then (once its socket is up) its SuperNode."""
        procs = sorted(self._stopped.pop(name), key=lambda p: not p.name.startswith("worker"))
        worker = _watching(self.group.restart(procs[0]))
        wait_for(self._centre(name).socket.exists, timeout, f"the restarted worker of {name}", worker)
        for proc in procs[1:]:
            self.group.restart(proc)

    def kill_server(self) -> None:
        """The coordinator dies: SuperLink, with the SuperExec and ServerApp it started, and `flwr run`."""
        self._stopped["server"] = self.group.kill(["SuperLink", "flwr run"])

    def restart_server(self, timeout: float = 60) -> None:
        """Start the SuperLink again on its database; SuperNodes reconnect by themselves."""
        if not self.durable:
            raise LaunchError("restart_server needs durable_superlink=True: an in-memory SuperLink "
                              "forgets its SuperNodes when it stops")
        superlink = next(p for p in self._stopped.pop("server") if p.name == "SuperLink")
        wait_for(self._superlink_up, timeout, "the restarted SuperLink", _watching(self.group.restart(superlink)))
        self._stop_orphaned_runs()

    def _stop_orphaned_runs(self) -> None:
        """Stop the runs whose ServerApp died with the coordinator: the SuperLink's database still lists
        them as running. A SuperNode that was pulling one of their messages when the SuperLink died
        retries the lost objects until Flower times the run out (~55 s measured) and only then takes the
        resumed run's messages; a stopped run frees it at its next try."""
        for run in self.runs():
            if run.get("status", "").startswith(("running", "starting", "pending")):
                out = self._flwr("stop", run["run-id"], "bridgepool")
                log.info("stopped run %s, left %s by the coordinator that died: %s",
                         run["run-id"], run["status"], out.stdout.strip()[-200:] or out.stderr.strip()[-200:])

    def _centre(self, name: str) -> Centre:
        return next(c for c in self.centres if c.name == name)

    # -------------------------------------------------------------- helpers
    def fleet_traffic(self) -> dict[str, int]:
        """Bytes between the centres and the SuperLink, as the SuperLink itself counted them
        on its Fleet API (`flwr ls`): measured traffic, summed over the runs it holds."""
        traffic = [r["network-traffic"] for r in self.runs()]
        return {"inbound": sum(t["inbound-bytes"] for t in traffic),
                "outbound": sum(t["outbound-bytes"] for t in traffic)}

    def runs(self) -> list[dict[str, Any]]:
        """The SuperLink's runs, as `flwr ls --format json` lists them."""
        out = self._flwr("ls", "bridgepool", "--format", "json")
        try:
            return json.loads(out.stdout)["runs"]
        except (json.JSONDecodeError, KeyError) as err:
            raise LaunchError(f"`flwr ls` gave no run list: {out.stdout[-300:]} {out.stderr[-300:]}") from err

    def _flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([venv_bin("flwr"), *args], capture_output=True, text=True,
                              env=self._env(self.server_home), cwd=self.run_dir, timeout=120)

    def _why_no_result(self) -> str:
        log = self.logs / "flwr-run.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.exists() else ""
        logs = {c.name: _read(self.logs / f"supernode-{c.name}.log") for c in self.centres}
        silent = [f"{name} ({supernode_refusal(text)})" if supernode_refusal(text) else name
                  for name, text in logs.items() if "SuperNode ID" not in text]
        hint = f"\ncentres whose SuperNode never connected: {', '.join(silent)}" if silent else ""
        return f"the run ended without a result; last lines of {log}:\n{tail}{hint}"

    def _worker_argv(self, c: Centre) -> list[str]:
        return commands.worker(c.name, str(c.data_dir), str(c.state_dir), str(c.socket),
                               threads=c.threads or self.threads, device=c.device, nproc=c.nproc, shard=c.shard,
                               speed=c.speed,
                               nice=5,  # all centres share this machine with the control plane
                               metrics_port=self.centre_metrics_ports().get(c.name, 0),
                               metrics_host=self.metrics_host,
                               # loopback is the worker's own default: named only for another host (netns)
                               coordinator="" if self.data_plane_host == "127.0.0.1" else self.data_plane_host,
                               data_plane_ca=self.pki.centre_ca_cert(c.name) if self.pki is not None else "",
                               prog=(sys.executable, "-m", "deploy.cli"),
                               socket_group=grp.getgrgid(pwd.getpwnam(self.app_user).pw_gid).gr_name
                               if self.app_user else None,
                               run_ids=self.warm)  # stock flower-supernode runs no runtime to admit tasks

    def data_plane_config(self) -> dict[str, Any]:
        """The run-config keys that put the ServerApp's data plane where this deployment's centres
        reach it: TLS with the SuperLink's certificate whenever the control plane has one."""
        tls = {"data-plane-certfile": self.pki.server_cert, "data-plane-keyfile": self.pki.server_key} \
            if self.pki is not None else {}
        return {"data-plane-host": self.superlink_host, "data-plane-port": self.data_plane_port,
                "data-plane-advertise": self.data_plane_host, **tls}

    def centre_metrics_ports(self) -> dict[str, int]:
        """Centre name -> its worker's metrics port; empty when metrics are off."""
        if not self.metrics_port:
            return {}
        return {c.name: self.metrics_port + 1 + i for i, c in enumerate(self.centres)}

    def metrics_endpoints(self) -> dict[str, str]:
        """What `bridgepool demo` prints: who -> Prometheus endpoint URL."""
        return {who: f"http://127.0.0.1:{port}/metrics" for who, port in self._metrics_ports().items()}

    def _metrics_ports(self) -> dict[str, int]:
        if not self.metrics_port:
            return {}
        return {"the server": self.metrics_port,
                **{f"centre {name}": port for name, port in self.centre_metrics_ports().items()}}

    def _env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Flower's SuperLink and SuperNode start `flower-superexec` by name: the running
        # environment's scripts must be on PATH even when the venv is not activated.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update({"FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(APP_DIR) + os.pathsep + env.get("PYTHONPATH", ""),
                    # Flower's SuperExec keeps its default 1 s task poll: with the warm runtime
                    # (clients/runtime.py) it only starts the ServerApp, once per run.
                    "FLWR_TELEMETRY_ENABLED": "0", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                    "MPLCONFIGDIR": str(self.run_dir / "server" / "mpl")})
        return env

    def _write_cli_config(self) -> None:
        (self.server_home / "config.toml").write_text(commands.flwr_config(  # the Control API: loopback only
            f"127.0.0.1:{self.superlink_internal_port}", self.pki, insecure=self.pki is None))

    # Where processes run and how they reach each other: one host here; deploy/netns.py
    # overrides these to put the server and each centre in namespaces of their own.
    superlink_host = "127.0.0.1"  # what the SuperLink binds (and the ServerApp's data plane)
    data_plane_host = "127.0.0.1"  # the host centres send model bytes to (`centre serve --coordinator`)
    metrics_host = "127.0.0.1"  # what the centre workers' metrics endpoints bind

    @property
    def superlink_address(self) -> str:
        """host:port the SuperNodes dial."""
        return f"127.0.0.1:{self.superlink_port}"

    def _wrap(self, where: str, argv: list[str]) -> list[str]:
        """The command line that runs `argv` on host `where` ("server" or a centre name)."""
        return argv

    def _spawn(self, where: str, name: str, argv: list[str], log: Path, env: dict[str, str],
               cwd: Path | None = None) -> Proc:
        return self.group.start(name, self._wrap(where, argv), log, env, cwd=cwd)

    def _superlink_up(self) -> bool:
        return port_open(self.superlink_internal_port) and port_open(self.superlink_port)

    def _internal_port(self) -> int:
        """A free loopback port for the SuperLink itself, away from the ports this federation and its
        caller lay out from base-port (the data plane, metrics and Prometheus bind later, so a port
        merely free now could be one of theirs: the kernel hands out ports near the base it gave)."""
        near = range(self.superlink_port - 32, self.data_plane_port + 33)
        for _ in range(100):
            port = free_base_port(1)
            if port not in near and port not in self._metrics_ports().values():
                return port
        raise LaunchError("no free loopback port away from the federation's own ports for the SuperLink")


def _watching(proc: Proc) -> ProcessGroup:
    """A group holding just `proc`, for a wait that fails only if that process dies
    (a finished `flwr run` in the federation's group is no reason to fail a restart)."""
    group = ProcessGroup()
    group.procs.append(proc)
    return group


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


__all__ = ["Centre", "LocalFederation", "LaunchError", "centre_dirs"]
