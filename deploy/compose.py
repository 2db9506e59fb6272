"""docker-compose.yml, generated from deploy/commands.py (the command lines the launchers use).

    bridgepool deploy compose            # rewrite docker-compose.yml and deploy/compose/* at the repository root
    bridgepool deploy compose --check    # exit 1 if a committed file differs from the generated one

One file for Compose v1 (Debian's docker-compose 1.29) and v2 (`docker compose`): no top-level
`name` (the project name comes from `-p` or .env's COMPOSE_PROJECT_NAME), no `configs.*.content`
(v2.23+): the flwr CLI's and Prometheus's configuration are generated files under deploy/compose/,
bind-mounted read-only. Environment variables with defaults (both versions substitute them):
  PROMETHEUS_IMAGE       prom/prometheus for users; the project image offline (Debian's prometheus)
  PROMETHEUS_PORT, GRAFANA_PORT   host ports (loopback only) of their UIs
  BRIDGEPOOL_RUN_CONFIG  extra `flwr run --run-config` pairs, e.g. 'model="tiny" rounds=3'
  BRIDGEPOOL_MAX_BYTES   text per centre prepared on first start (default 3 MB, as the demo)

Topology (`docker compose up` starts a training run; Grafana on http://127.0.0.1:3000):
  key-C               one-shot, per centre: deploy/centre-key.sh makes the centre's own SuperNode
                      key pair in its own volume and places only the public half in a hand-over volume
  pki                 one-shot: deploy/pki.sh writes the CA and the SuperLink certificate and takes
                      the centres' public keys from the hand-over volumes; it mounts no centre key
  superlink           SuperLink (state in --database on a volume), on 127.0.0.1 of its own network
                      namespace only; runs each ServerApp in a subprocess of its own SuperExec
                      (Flower 1.41 `--isolation subprocess`), so there is no separate server-side
                      container to authenticate
  gate                the Fleet gate (server/fleetgate.py) in the SuperLink's network namespace, on
                      the port the centres dial: forwards /v1/fleet/... and answers 403 to Control
                      and Runtime calls (issue 19, threat 1)
  register            one-shot: registers every centre's public key (SuperNode authentication)
  prep-C, worker-C, supernode-C   per centre: data preparation (one-shot), the training worker,
                      the SuperNode whose ClientApp relays to the worker over a Unix socket
  submit              one-shot: `flwr run` of this app on the three centres
  prometheus, grafana share the SuperLink's network namespace: the ServerApp's metrics endpoint
                      is on its 127.0.0.1, each centre's worker on its centre network
The operator's services (register, submit: the flwr CLI) share the SuperLink's network namespace
too and dial its Control API at 127.0.0.1: no network carries the Control or Runtime API.
Sovereignty: a centre's data, state and key volumes are mounted in that centre's services only
(data read-only, except by its preparation step, the one writer); the server side mounts none;
each centre network is internal and holds only that centre and the SuperLink's network namespace,
where a centre reaches the gate and the ServerApp's data plane, not the SuperLink itself.

Adding a flag or a port: each service is one `_ours(command=commands.X(...), ...)` entry in
compose() below; a flag is an argument of its deploy/commands.py function, a run-config key one
line in run_config(). Containers on a shared network reach each other's ports without `ports:`
(that publishes to the host only).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from deploy import commands
from deploy.commands import Pki

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CONFIG_DIR = "deploy/compose"  # generated configuration files, bind-mounted (relative to ROOT)
FLWR_CONFIG = f"{CONFIG_DIR}/flwr-config.toml"
PROMETHEUS_CONFIG = f"{CONFIG_DIR}/prometheus.yml"
IMAGE = "bridgepool:0.1.0"
BUILD = {"context": ".", "dockerfile": "deploy/Dockerfile"}
PROMETHEUS_IMAGE = "prom/prometheus:v2.42.0"  # the versions deploy/grafana/compose.yml uses; 2.42 is Debian's too
GRAFANA_IMAGE = "grafana/grafana:10.4.2"
PKI = Pki(PurePosixPath("/pki"))
HANDOVER = "/handover"  # where the centres' public keys travel to the coordinator's pki step
SERVER_METRICS_PORT = 9300  # ServerApp, on 127.0.0.1 of the SuperLink's network namespace
CENTRE_METRICS_PORT = 9301  # each worker, in its own container
DATA_PLANE_PORT = 9095  # the ServerApp's data plane, in the superlink container
# The SuperLink itself (Fleet, Control and Runtime APIs on one port) on 127.0.0.1 of its network namespace;
# the centres dial the gate on commands.SUPERLINK_PORT, which forwards only the Fleet API here.
SUPERLINK_LOOPBACK_PORT = 9100
DATA_MAX_BYTES = 3_000_000  # per centre, as `bridgepool demo`
# Submitted bundles' user in each SuperNode container (Debian's, in the image): the app host drops to it before the
# bundle's code runs (clients/apphost.py); the worker's socket is 0660 for its group (issue 19, threat 3).
APP_USER, APP_GROUP = "nobody", "nogroup"
# The bundles' network stays the SuperNode container's: no `cap_add: [SYS_ADMIN]`, so the runtime's
# `--app-network auto` (clients/appnet.py) cannot unshare one and logs why. CAP_SYS_ADMIN would go to the container's
# root processes (Flower's SuperNode, which parses what the coordinator sends, and the runtime) and lifts Docker's
# seccomp filter on mount/unshare/setns for them: a bundle that got from nobody to the container's root would hold
# the usual container-escape tools. What it would buy is smaller here than on a shared host: a centre's network
# holds only its own worker and the coordinator's namespace (gate, data plane, monitoring), so a bundle's sockets
# reach the coordinator, not the world. An operator who weighs it the other way adds the capability to the
# SuperNode services; `auto` then gives every app host an empty namespace (README, threat model, row 3).
HEADER = """\
# GENERATED by `bridgepool deploy compose` from deploy/compose.py and deploy/commands.py: do not edit.
# tests/test_deployment.py fails when this file and the generator disagree.
#   docker compose -p bridgepool up --build   # TLS, SuperNode keys, data, a 3-centre run, Grafana on :3000
#   docker-compose -p bridgepool up --build   # Compose v1 (1.29) reads the same file
# See README.md, "Multi-node deployment"; without a registry: `bridgepool deploy up --offline`.
"""


def centres_and_sources(n: int = 3) -> list[tuple[str, str]]:
    from clients.data import DEFAULT_CENTRES

    return list(DEFAULT_CENTRES[:n])


def run_config(centres: int) -> dict[str, Any]:
    """What the submitter overrides; everything else is pyproject's [tool.flwr.app.config]."""
    return {"expected-centres": centres, "run-dir": "/runs/compose", "run-name": "compose",
            "metrics-port": SERVER_METRICS_PORT,
            # The ServerApp's data plane (server/dataplane.py), in the superlink container, reached by each
            # centre's worker over its centre network as "superlink" (the certificate's SAN), over TLS.
            "data-plane-host": "0.0.0.0", "data-plane-port": DATA_PLANE_PORT, "data-plane-advertise": "superlink",
            "data-plane-certfile": PKI.server_cert, "data-plane-keyfile": PKI.server_key,
            # Each centre's name pinned to the key it registered (server/identity.py): the registry pki.sh fills.
            "centre-keys": PKI.public_dir}


def _ours(**service: Any) -> dict[str, Any]:
    if "command" in service:
        service["command"] = _Flow(service["command"])
    return {"image": IMAGE, "build": dict(BUILD), **service}


def _flwr_cli(**service: Any) -> dict[str, Any]:
    """A service that runs the `flwr` CLI: its config.toml names the SuperLink (on the loopback of the
    network namespace it shares with it: the Control API is on no network) and the CA."""
    return _ours(environment=_env("/flwr-home"), **service,
                 volumes=[f"./{FLWR_CONFIG}:/flwr-home/config.toml:ro", "pki-public:/pki/public:ro"],
                 network_mode="service:superlink")


def _env(flwr_home: str) -> dict[str, str]:
    return {"FLWR_HOME": flwr_home, "FLWR_TELEMETRY_ENABLED": "0"}


def compose(n_centres: int = 3, centres: list[tuple[str, str]] | None = None,
            config: dict[str, Any] | None = None, nproc: Mapping[str, int] | None = None,
            shard: Collection[str] = ()) -> dict[str, Any]:
    """`centres`: (name, source) pairs, e.g. a federation spec's (deploy/spec.py); default the demo's.
    `config`: a spec's [config] run-config keys, submitted with the run (the deployment's own keys win).
    `nproc`: data-parallel ranks per centre name (default 1); a centre's ranks share its worker's container.
    `shard`: the centres whose model is split over those ranks (FSDP, `--shard`)."""
    nproc = nproc or {}
    centres = centres if centres is not None else centres_and_sources(n_centres)
    names = [name for name, _ in centres]
    # The centres reach the gate and the data plane as "superlink"; the SuperLink's own SuperExec (which starts each
    # ServerApp and dials its Runtime API), the gate and the flwr CLI dial 127.0.0.1 (over TLS): the only two SANs.
    pki_argv, pki_env = commands.make_pki("/app/deploy/pki.sh", str(PKI.root),
                                          {c: f"{HANDOVER}/{c}/{c}.pub" for c in names},
                                          ["DNS:superlink", "IP:127.0.0.1"])
    superlink_addr = f"superlink:{commands.SUPERLINK_PORT}"
    services: dict[str, Any] = {
        **{f"key-{c}": _ours(command=commands.centre_key("/app/deploy/centre-key.sh", PKI.centre_dir(c), c,
                                                         f"{HANDOVER}/{c}"),
                             network_mode="none", volumes=[f"pki-{c}:{PKI.centre_dir(c)}", f"pub-{c}:{HANDOVER}/{c}"])
           for c in names},
        "pki": _ours(command=pki_argv, environment=pki_env, network_mode="none", volumes=[
            "pki-ca:/pki/ca", "pki-server:/pki/server", "pki-public:/pki/public",
            *(f"pub-{c}:{HANDOVER}/{c}:ro" for c in names)],
            depends_on={f"key-{c}": {"condition": "service_completed_successfully"} for c in names}),
        "superlink": _ours(
            command=commands.superlink(SUPERLINK_LOOPBACK_PORT, "/state/superlink.db", PKI, host="127.0.0.1"),
            environment=_env("/state/flwr-home"),
            volumes=["superlink-state:/state", "runs:/runs", "pki-server:/pki/server:ro", "pki-public:/pki/public:ro"],
            # On the centre networks for the gate and the ServerApp's data plane; the SuperLink binds 127.0.0.1.
            networks=[*(f"centre-{c}" for c in names), "monitoring"],
            # Grafana and Prometheus share this network namespace; their UIs, on the host's loopback only.
            ports=["127.0.0.1:${GRAFANA_PORT:-3000}:3000", "127.0.0.1:${PROMETHEUS_PORT:-9090}:9090"],
            healthcheck={"test": ["CMD", "python", "-c", "import socket; socket.create_connection("
                                  f"('127.0.0.1', {SUPERLINK_LOOPBACK_PORT}), 2)"],
                         "interval": "2s", "timeout": "10s", "retries": 150},  # loaded hosts: 5 min
            depends_on={"pki": {"condition": "service_completed_successfully"}}),
        "gate": _ours(
            command=commands.fleet_gate(f"0.0.0.0:{commands.SUPERLINK_PORT}", SUPERLINK_LOOPBACK_PORT, PKI,
                                        prog=("python",)),
            network_mode="service:superlink", volumes=["pki-server:/pki/server:ro"],
            healthcheck={"test": ["CMD", "python", "-c", "import socket; socket.create_connection("
                                  f"('127.0.0.1', {commands.SUPERLINK_PORT}), 2)"],
                         "interval": "2s", "timeout": "10s", "retries": 150},
            depends_on={"superlink": {"condition": "service_healthy"}}),
        "register": _flwr_cli(
            command=commands.register_keys([PKI.public_key(c) for c in names]),
            depends_on={"superlink": {"condition": "service_healthy"}}),
    }
    for name, source in centres:
        # A spec's local corpus (an absolute path on this host) is bind-mounted read-only into its prep step only.
        local = not source.startswith(("hf:", "manpages:"))
        prep = commands.prepare_data("/data/corpus", "/source" if local else source, max_bytes=DATA_MAX_BYTES)
        prep[prep.index("--max-bytes") + 1] = f"${{BRIDGEPOOL_MAX_BYTES:-{DATA_MAX_BYTES}}}"  # tests: less
        services[f"prep-{name}"] = _ours(
            command=prep, network_mode="none",  # the only writer of the centre's data
            volumes=[f"data-{name}:/data", *([f"{source}:/source:ro"] if local else [])])
        services[f"worker-{name}"] = _ours(
            command=commands.worker(name, "/data/corpus", "/state", "/state/worker.sock",
                                    metrics_port=CENTRE_METRICS_PORT, metrics_host="0.0.0.0",
                                    coordinator="superlink", data_plane_ca=PKI.centre_ca_cert(name),
                                    nproc=nproc.get(name, 1), shard=name in shard,
                                    socket_group=APP_GROUP),
            environment=_env("/state/flwr-home"),
            volumes=[f"data-{name}:/data:ro", f"state-{name}:/state", "pki-public:/pki/public:ro"],
            networks=[f"centre-{name}"],
            healthcheck={"test": ["CMD", "test", "-S", "/state/worker.sock"], "interval": "2s", "retries": 300},
            depends_on={f"prep-{name}": {"condition": "service_completed_successfully"},
                        "pki": {"condition": "service_completed_successfully"}})  # the CA it checks the data plane with
        services[f"supernode-{name}"] = _ours(
            command=commands.supernode(name, superlink_addr, "/state/worker.sock", commands.SUPERNODE_RUNTIME_PORT,
                                       PKI, app_user=APP_USER),
            environment=_env("/state/flwr-home"),
            volumes=[f"state-{name}:/state", f"pki-{name}:{PKI.centre_dir(name)}:ro", "pki-public:/pki/public:ro"],
            networks=[f"centre-{name}"], restart="on-failure",
            depends_on={f"worker-{name}": {"condition": "service_healthy"}, "gate": {"condition": "service_healthy"},
                        "register": {"condition": "service_completed_successfully"}})
    services["submit"] = _flwr_cli(
        # A second --run-config, empty unless set: later pairs override the first ones.
        command=[*commands.flwr_run("/app", {**(config or {}), **run_config(len(names))}),
                 "--run-config", "${BRIDGEPOOL_RUN_CONFIG:-}"],
        depends_on={"register": {"condition": "service_completed_successfully"},
                    **{f"supernode-{c}": {"condition": "service_started"} for c in names}})
    # prom/prometheus, or offline the project image with Debian's prometheus: both have `prometheus`
    # on PATH and read the same flags and file.
    services["prometheus"] = {
        "image": f"${{PROMETHEUS_IMAGE:-{PROMETHEUS_IMAGE}}}", "network_mode": "service:superlink",
        "entrypoint": ["prometheus"],
        "command": _Flow(["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                          "--web.listen-address=0.0.0.0:9090"]),
        "volumes": [f"./{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro", "prometheus-data:/prometheus"],
        "depends_on": ["superlink"]}
    services["grafana"] = {
        "image": GRAFANA_IMAGE, "network_mode": "service:superlink",  # its datasource: 127.0.0.1:9090
        "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/bridgepool.json"},
        "volumes": ["./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
                    "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro", "grafana-data:/var/lib/grafana"],
        "depends_on": ["prometheus"]}
    volumes = ["pki-ca", "pki-server", "pki-public", "superlink-state", "runs", "prometheus-data", "grafana-data",
               *(f"{kind}-{c}" for c in names for kind in ("pki", "pub", "data", "state"))]
    return {
        "services": services,
        "networks": {**{f"centre-{c}": {"internal": True} for c in names}, "monitoring": {}},
        "volumes": {v: {} for v in volumes},
    }


def config_files(n_centres: int = 3, centres: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """The bind-mounted configuration files (relative to the compose file) and their text."""
    names = [name for name, _ in (centres if centres is not None else centres_and_sources(n_centres))]
    return {FLWR_CONFIG: commands.flwr_config(f"127.0.0.1:{SUPERLINK_LOOPBACK_PORT}", PKI),
            PROMETHEUS_CONFIG: prometheus_config(names)}


def prometheus_config(names: list[str]) -> str:
    """Same jobs and labels as deploy/prometheus.py writes for the demo, with compose's targets."""
    return yaml.safe_dump({
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "scrape_configs": [
            {"job_name": "bridgepool-server",
             "static_configs": [{"targets": [f"127.0.0.1:{SERVER_METRICS_PORT}"]}]},
            {"job_name": "bridgepool-centres",
             "static_configs": [{"targets": [f"worker-{c}:{CENTRE_METRICS_PORT}"], "labels": {"centre_endpoint": c}}
                                for c in names]},
        ]}, sort_keys=False)


class _Flow(list):
    """A command line: written on one (wrapped) line."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: the file is read by people
        return True


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                                             style="|" if "\n" in v else None))


def render(n_centres: int = 3, centres: list[tuple[str, str]] | None = None,
           config: dict[str, Any] | None = None, nproc: Mapping[str, int] | None = None,
           shard: Collection[str] = ()) -> str:
    return HEADER + yaml.dump(compose(n_centres, centres, config, nproc, shard), Dumper=_Dumper, sort_keys=False,
                              width=120, default_flow_style=False)


def write(out: Path, centres: list[tuple[str, str]], config: dict[str, Any] | None = None,
          nproc: Mapping[str, int] | None = None, shard: Collection[str] = ()) -> Path:
    """The compose file for these (name, source) centres and run `config` at `out`, its configuration
    files beside it."""
    out = Path(out)
    for p, text in _files(out, centres, config, nproc, shard).items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return out


def _files(out: Path, centres: list[tuple[str, str]] | None = None,
           config: dict[str, Any] | None = None, nproc: Mapping[str, int] | None = None,
           shard: Collection[str] = ()) -> dict[Path, str]:
    n = len(centres) if centres is not None else 3
    return {out: render(centres=centres, config=config, nproc=nproc, shard=shard),
            **{out.parent / rel: text for rel, text in config_files(n, centres).items()}}


def main(args: argparse.Namespace, centres: list[tuple[str, str]] | None = None,
         config: dict[str, Any] | None = None, nproc: Mapping[str, int] | None = None,
         shard: Collection[str] = ()) -> int:
    """Writes (or checks) the compose file at args.out and its configuration files beside it."""
    out = Path(args.out)
    files = _files(out, centres, config, nproc, shard)
    if args.check:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        for p in stale:
            print(f"{p} differs from what `bridgepool deploy compose` generates; regenerate it")
        if not stale:
            print(f"{out} and its configuration files are up to date")
        return 1 if stale else 0
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p}")
    return 0
