"""Every command line of a bridgepool federation, in one place.

The loopback launcher (deploy/local.py), the network-namespace launcher
(deploy/netns.py) and the generated docker-compose.yml (deploy/compose.py) all
build their processes from these functions, so a flag cannot differ between
them. TLS and SuperNode authentication are on by default: a command without
certificates is refused unless the caller passes `insecure=True` (local
debugging only).

Flags are Flower 1.41's (`flower-superlink --help`, `flower-supernode --help`,
`flwr run --help`); tests/test_deployment.py checks each one against the
installed binaries and against `bridgepool`'s own argparse.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

SUPERLINK_PORT = 9093  # Fleet, Control and Runtime APIs: one HTTP(S) port in Flower 1.4x
SUPERNODE_RUNTIME_PORT = 9094  # a SuperNode's Runtime API for its own SuperExec (bound to 127.0.0.1)
CONNECTION = "bridgepool"  # the [superlink.NAME] of `flwr`'s config.toml


class InsecureRefused(ValueError):
    """A command was asked for without certificates and without `insecure=True`."""


@dataclass(frozen=True)
class Pki:
    """Where deploy/pki.sh puts certificates and keys under `root` (a host or container path)."""

    root: PurePath

    @property
    def ca_cert(self) -> str:  # what the `flwr` CLI verifies the SuperLink with
        return str(self.root / "public" / "ca.crt")

    @property
    def server_ca_cert(self) -> str:
        return str(self.root / "server" / "ca.crt")

    @property
    def server_cert(self) -> str:
        return str(self.root / "server" / "server.crt")

    @property
    def server_key(self) -> str:
        return str(self.root / "server" / "server.key")

    @property
    def public_dir(self) -> str:  # the registry of CENTRE.pub: the ServerApp's `centre-keys` (server/identity.py)
        return str(self.root / "public")

    def public_key(self, centre: str) -> str:  # registered at the SuperLink
        return str(self.root / "public" / f"{centre}.pub")

    def centre_dir(self, centre: str) -> str:
        return str(self.root / "centres" / centre)

    def centre_ca_cert(self, centre: str) -> str:  # the CA certificate the coordinator publishes
        return str(self.root / "public" / "ca.crt")

    def centre_public_key(self, centre: str) -> str:  # made by the centre itself, handed over
        return str(self.root / "centres" / centre / "supernode.key.pub")

    def private_key(self, centre: str) -> str:  # only this centre's SuperNode reads it
        return str(self.root / "centres" / centre / "supernode.key")


def _security(pki: Pki | None, insecure: bool, who: str) -> None:
    if pki is None and not insecure:
        raise InsecureRefused(f"{who}: no certificates given; pass a Pki (deploy/pki.sh) for TLS and "
                              "SuperNode authentication, or insecure=True to opt in to plain HTTP")
    if pki is not None and insecure:
        raise ValueError(f"{who}: both certificates and insecure=True given; choose one")


def superlink(port: int, database: str | None, pki: Pki | None = None, *, insecure: bool = False,
              host: str = "0.0.0.0", exe: str = "flower-superlink") -> list[str]:
    """The SuperLink; its own SuperExec runs each ServerApp in a subprocess (`--isolation subprocess`).

    With certificates: HTTPS and `--enable-supernode-auth` (only registered keys may join).
    `database`: its SQLite state file, kept across restarts; None: Flower's in-memory state.
    """
    _security(pki, insecure, "SuperLink")
    argv = [exe]
    if pki is None:
        argv += ["--insecure"]
    else:
        argv += ["--ssl-ca-certfile", pki.server_ca_cert, "--ssl-certfile", pki.server_cert,
                 "--ssl-keyfile", pki.server_key, "--enable-supernode-auth"]
    # No network at run time: app dependencies are installed in the image/venv up front.
    return argv + ["--disable-runtime-dependency-installation", "--isolation", "subprocess",
                   "--host", host, "--port", str(port)] + (["--database", database] if database else [])


def node_config(centre: str, worker_socket: str) -> str:
    """`--node-config`: the centre's name and its worker's socket (clients/app.py reads both)."""
    return f'centre="{centre}" worker-socket="{worker_socket}"'


def fleet_gate(listen: str, superlink_port: int, pki: Pki | None = None,
               prog: Sequence[str] = ("python3",)) -> list[str]:
    """The Fleet gate (server/fleetgate.py) on `listen`, in front of the SuperLink on loopback port
    `superlink_port`: the only part of the SuperLink the centres reach (Fleet API only)."""
    argv = [*prog, "-m", "server.fleetgate", "--listen", listen]
    if pki is None:
        return argv + ["--upstream", f"http://127.0.0.1:{superlink_port}"]
    return argv + ["--upstream", f"https://127.0.0.1:{superlink_port}", "--certfile", pki.server_cert,
                   "--keyfile", pki.server_key, "--ca-file", pki.server_ca_cert]


def supernode(centre: str, superlink: str, worker_socket: str, runtime_port: int, pki: Pki | None = None, *,
              insecure: bool = False, max_retries: int | None = None, warm: bool = True,
              exe: str = "flower-supernode", prog: Sequence[str] = ("bridgepool",),
              app_user: str | None = None) -> list[str]:
    """A centre's SuperNode; its ClientApp relays to the centre worker over `worker_socket`.

    `warm` (default): `bridgepool centre supernode` (clients/supernode.py), i.e. Flower's SuperNode
    with process isolation, one long-lived ClientApp runtime and short polls; otherwise stock
    `exe` with a new `flwr-clientapp` process per message. Every other flag is Flower's.
    """
    _security(pki, insecure, f"SuperNode {centre}")
    argv = [*prog, "centre", "supernode"] if warm else [exe]
    if app_user:  # submitted bundles run as this user (clients/runtime.py AppHost)
        argv += ["--app-user", app_user]
    if pki is None:
        argv += ["--insecure"]
    else:
        argv += ["--root-certificates", pki.centre_ca_cert(centre),
                 "--auth-supernode-private-key", pki.private_key(centre)]
    argv += ["--superlink", superlink, "--port", str(runtime_port), "--isolation", "process" if warm else "subprocess",
             "--node-config", node_config(centre, worker_socket)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def worker(centre: str, data_dir: str, state_dir: str, socket: str, *, threads: int = 0, nice: int = 0,
           metrics_port: int = 0, metrics_host: str = "127.0.0.1", coordinator: str = "", data_plane_ca: str = "",
           device: str = "", nproc: int = 1, shard: bool = False, speed: float = 1.0,
           prog: Sequence[str] = ("bridgepool",), socket_group: str | None = None,
           run_ids: bool = True) -> list[str]:
    """The centre's long-lived training worker (`bridgepool centre serve`); `coordinator` and
    `data_plane_ca`: the only host it sends model bytes to, and the CA that host must show;
    `device`: the centre's own (a spec's centre device), over the run config's; `nproc`: its
    data-parallel ranks (torchrun, clients/ranks.py), `shard`: its model split over them (FSDP);
    `speed` < 1: an emulated slower centre
    (a spec's centre speed); `run_ids`: the centre's runtime admits each task by its SuperLink run id
    (clients/runs.py; False only for stock flower-supernode, which runs no such runtime)."""
    argv = [*prog, "centre", "serve", "--centre", centre, "--data-dir", data_dir, "--state-dir", state_dir,
            "--socket", socket]
    if run_ids:
        argv += ["--require-run-ids"]
    if socket_group:  # the bundles' user's group may relay (socket 0660); else the worker's user only
        argv += ["--socket-group", socket_group]
    if nice:
        argv += ["--nice", str(nice)]
    if threads:
        argv += ["--threads", str(threads)]
    if device:
        argv += ["--device", device]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    if shard:
        argv += ["--shard"]
    if speed != 1.0:
        argv += ["--speed", repr(speed)]
    if metrics_port:
        argv += ["--metrics-port", str(metrics_port), "--metrics-host", metrics_host]
    if coordinator:
        argv += ["--coordinator", coordinator]
    if data_plane_ca:
        argv += ["--data-plane-ca", data_plane_ca]
    return argv


def prepare_data(out: str, source: str, *, max_bytes: int = 0, if_missing: bool = True, undecodable: str = "stop",
                 prog: Sequence[str] = ("bridgepool",)) -> list[str]:
    """One centre's corpus (`bridgepool data prepare`); `if_missing` keeps a prepared one."""
    argv = [*prog, "data", "prepare", "--out", out, "--source", source]
    if max_bytes:
        argv += ["--max-bytes", str(max_bytes)]
    if undecodable != "stop":
        argv += ["--undecodable", undecodable]
    if if_missing:
        argv += ["--if-missing"]
    return argv


def flwr_run(app_dir: str, run_config: Mapping[str, Any], *, connection: str = CONNECTION, stream: bool = True,
             exe: str = "flwr") -> list[str]:
    """Submit a run: `flwr run APP_DIR CONNECTION --run-config 'k=v ...'`."""
    argv = [exe, "run", app_dir, connection]
    if stream:
        argv += ["--stream"]
    if run_config:
        argv += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
    return argv


def register_supernode(public_key: str, *, connection: str = CONNECTION, exe: str = "flwr") -> list[str]:
    """Register a centre's public key at the SuperLink (needed with `--enable-supernode-auth`)."""
    return [exe, "supernode", "register", public_key, connection, "--format", "json"]


def register_keys(public_keys: Sequence[str], *, connection: str = CONNECTION,
                  prog: Sequence[str] = ("bridgepool",)) -> list[str]:
    """`bridgepool deploy register`: register_supernode for each key, keeping ones already registered."""
    return [*prog, "deploy", "register", "--connection", connection, *public_keys]


def centre_key(script: str, centre_dir: str, centre: str, outbox: str | None = None) -> list[str]:
    """deploy/centre-key.sh, run at the centre: its own SuperNode key pair in `centre_dir`, the
    public half also copied to `outbox` for hand-over."""
    return ["sh", script, centre_dir, centre, *([outbox] if outbox else [])]


def make_pki(script: str, out: str, public_keys: Mapping[str, str],
             sans: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """deploy/pki.sh, run by the coordinator: argv (the CA, the SuperLink certificate, the centres'
    public keys to register, centre -> path) and the environment it reads (the certificate's SANs)."""
    return ["sh", script, out, *(f"{c}={k}" for c, k in public_keys.items())], {"SUPERLINK_SANS": ",".join(sans)}


def pki_steps(deploy_dir: str, pki: Pki, centres: Sequence[str],
              sans: Sequence[str]) -> list[tuple[list[str], dict[str, str]]]:
    """For launchers that play every part on one machine (local, netns, tests): each centre makes its
    key pair in its own directory, then the coordinator registers only the public halves."""
    steps: list[tuple[list[str], dict[str, str]]] = [
        (centre_key(f"{deploy_dir}/centre-key.sh", pki.centre_dir(c), c), {}) for c in centres]
    steps.append(make_pki(f"{deploy_dir}/pki.sh", str(pki.root), {c: pki.centre_public_key(c) for c in centres}, sans))
    return steps


def flwr_config(address: str, pki: Pki | None = None, *, insecure: bool = False,
                connection: str = CONNECTION) -> str:
    """`$FLWR_HOME/config.toml` for the `flwr` CLI: one connection, the default."""
    _security(pki, insecure, "flwr CLI")
    security = "insecure = true" if pki is None else f"root-certificates = {json.dumps(pki.ca_cert)}"
    return (f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
            f'address = "{address}"\n{security}\n')


def toml_value(value: Any) -> str:
    """A run-config value as `flwr run --run-config` parses it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


__all__ = ["CONNECTION", "SUPERLINK_PORT", "SUPERNODE_RUNTIME_PORT", "InsecureRefused", "Pki", "flwr_config",
           "centre_key", "flwr_run", "make_pki", "pki_steps", "node_config", "prepare_data", "register_keys",
           "register_supernode", "superlink", "supernode", "toml_value", "worker"]
