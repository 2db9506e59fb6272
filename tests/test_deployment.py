"""docker-compose.yml, checked structurally (no Docker engine runs here): it is what the generator
writes, every service can be built or pulled, centres' volumes stay with their centre, and every
command-line flag is one that Flower 1.41 and `bridgepool` accept. Fast: no federation."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from clients.supernode import parser as supernode_parser
from deploy import commands, compose, images
from deploy.cli import _parser
from deploy.local import Centre, LocalFederation
from deploy.netns import NetnsFederation
from deploy.processes import venv_bin
from deploy.prometheus import scrape_config
from deploy.register import supernode_refusal
from server import fleetgate

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
CENTRES = [name for name, _ in compose.centres_and_sources()]
SERVER_SIDE = ["pki", "superlink", "gate", "register", "submit", "prometheus", "grafana"]
FLOWER = {"flower-superlink": ["flower-superlink"], "flower-supernode": ["flower-supernode"],
          "flwr run": ["flwr", "run"], "flwr supernode register": ["flwr", "supernode", "register"]}


def centre_services(centre: str) -> list[str]:
    return [f"prep-{centre}", f"worker-{centre}", f"supernode-{centre}", f"key-{centre}"]


def mounts(service: str) -> dict[str, str]:
    """volume or ./path -> 'target[:ro]' of one service."""
    out = {}
    for spec in SERVICES[service].get("volumes", []):
        source, rest = spec.split(":", 1)
        out[source] = rest
    return out


def flags(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


@pytest.fixture(scope="module")
def flower_help() -> dict[str, str]:
    """`--help` of each Flower command the deployment uses, from the installed Flower."""
    out = {}
    for name, argv in FLOWER.items():
        done = subprocess.run([venv_bin(argv[0]), *argv[1:], "--help"], capture_output=True, text=True,
                              timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "TERM": "dumb"})
        assert done.returncode == 0, (name, done.stderr[-500:])
        out[name] = done.stdout + done.stderr
    return out


def test_committed_compose_is_the_generated_one():
    assert (ROOT / "docker-compose.yml").read_text() == compose.render(), \
        "docker-compose.yml is stale: run `bridgepool deploy compose`"
    for rel, text in compose.config_files().items():
        assert (ROOT / rel).read_text() == text, f"{rel} is stale: run `bridgepool deploy compose`"


def test_one_file_for_compose_v1_and_v2():
    """Nothing only Compose v2 reads (tests/test_compose_up.py runs `config` and `up` with v1 for real)."""
    assert "name" not in COMPOSE, "top-level name: Compose v2 only (the project name: -p or .env)"
    assert "configs" not in COMPOSE or not any("content" in c for c in COMPOSE["configs"].values()), \
        "configs.*.content: Compose v2.23+ only"
    text = (ROOT / "docker-compose.yml").read_text()
    variables = re.findall(r"\$\{([^}]*)\}", text)
    assert variables and all(re.fullmatch(r"[A-Z_]+:-[^}]*", v) for v in variables), variables  # all defaulted
    assert (ROOT / ".env").read_text().count("COMPOSE_PROJECT_NAME=bridgepool") == 1


def _default(value: str) -> str:
    """`${VAR:-default}` -> default (what Compose uses when VAR is unset)."""
    m = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return m.group(1) if m else value


def test_every_service_can_be_built_or_pulled():
    for name, svc in SERVICES.items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        else:  # pulled: pinned to a version, never `latest`
            image = _default(svc["image"])
            assert re.fullmatch(r"[\w./-]+:v?\d+(\.\d+)+", image), (name, image)
        for source in mounts(name):
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in re.findall(r"(?:flwr|torch)==[\d.]+", pyproject):  # the image installs the same pins
        assert pin in dockerfile or pin.startswith("flwr"), pin
    # It installs pyproject's dependency list (so flwr's pin too), then this package without deps.
    assert "['project']['dependencies']" in dockerfile and "-r /src/requirements.txt" in dockerfile
    assert "--no-deps --no-build-isolation --no-index ." in dockerfile and '"flwr==1.41.0"' in pyproject
    assert images.TORCH.split("+")[0] in pyproject  # the offline build's CPU wheel: the same pin


def test_centre_volumes_stay_with_their_centre_and_data_is_read_only():
    for centre in CENTRES:
        for kind in ("data", "state", "pki"):
            volume = f"{kind}-{centre}"
            users = {name for name in SERVICES if volume in mounts(name)}
            assert users and users <= set(centre_services(centre)), (volume, users)  # not even the pki step
        # The public half travels to the coordinator's pki step, read-only there; the key pair stays home.
        assert {name for name in SERVICES if f"pub-{centre}" in mounts(name)} == {f"key-{centre}", "pki"}
        assert mounts("pki")[f"pub-{centre}"].endswith(":ro")
        assert SERVICES[f"key-{centre}"]["network_mode"] == "none"
        data = f"data-{centre}"
        assert not mounts(f"prep-{centre}")[data].endswith(":ro")  # the one writer
        assert mounts(f"worker-{centre}")[data].endswith(":ro")
        assert data not in mounts(f"supernode-{centre}")  # the ClientApp relays; it never reads data
    for name in SERVER_SIDE:
        assert not any(v.startswith(("data-", "state-")) for v in mounts(name)), name
    assert not any(v.startswith("pki-") and v[4:] in CENTRES for v in mounts("superlink"))  # no centre keys


def test_each_centre_network_holds_only_that_centre_and_the_superlink():
    networks = COMPOSE["networks"]
    for centre in CENTRES:
        net = f"centre-{centre}"
        assert networks[net] == {"internal": True}
        members = {name for name, svc in SERVICES.items() if net in svc.get("networks", [])}
        assert members == {"superlink", f"worker-{centre}", f"supernode-{centre}"}, members
        assert SERVICES[f"prep-{centre}"]["network_mode"] == "none"
        for name in centre_services(centre)[1:3]:
            assert SERVICES[name]["networks"] == [net], name
    assert SERVICES["prometheus"]["network_mode"] == SERVICES["grafana"]["network_mode"] == "service:superlink"


def test_centres_reach_only_the_fleet_gate_and_the_data_plane():
    """Issue 19, threat 1 in compose: the SuperLink (Fleet, Control and Runtime APIs on one port) binds the
    loopback of its network namespace; what the centre networks reach there is the Fleet gate and the
    ServerApp's data plane. The operator's flwr CLI (register, submit) shares that namespace to reach Control."""
    superlink = SERVICES["superlink"]["command"]
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1"
    loopback = superlink[superlink.index("--port") + 1]
    shares = {name for name, svc in SERVICES.items() if svc.get("network_mode") == "service:superlink"}
    assert shares == {"gate", "register", "submit", "prometheus", "grafana"}, shares
    # The Control API's clients (the flwr CLI, and `bridgepool deploy register` which runs it) dial it at loopback.
    cli = {n for n, svc in SERVICES.items() if svc.get("command", [""])[0] == "flwr"
           or svc.get("command", [])[:3] == ["bridgepool", "deploy", "register"]}
    assert cli == {"register", "submit"} and cli <= shares
    flwr_address = re.search(r'address = "([^"]+)"', (ROOT / compose.FLWR_CONFIG).read_text()).group(1)
    assert flwr_address == f"127.0.0.1:{loopback}"
    for centre in CENTRES:  # every centre service dials the gate's port, never the SuperLink's own
        for name in centre_services(centre):
            text = " ".join(SERVICES[name].get("command", []))
            assert f":{loopback}" not in text, (name, text)
        node = SERVICES[f"supernode-{centre}"]["command"]
        assert node[node.index("--superlink") + 1] == f"superlink:{commands.SUPERLINK_PORT}"
        worker = SERVICES[f"worker-{centre}"]["command"]
        assert worker[worker.index("--coordinator") + 1] == "superlink"  # the data plane (its own TLS server)
    # What listens beyond loopback in the SuperLink's namespace, on the centre networks: the gate, the
    # ServerApp's data plane, and the monitoring UIs (published to the host's loopback, read-only).
    gate = SERVICES["gate"]["command"]
    assert gate[gate.index("--listen") + 1] == f"0.0.0.0:{commands.SUPERLINK_PORT}"
    assert "--certfile" in gate and "--ca-file" in gate  # TLS to the centres and to the SuperLink
    submitted = SERVICES["submit"]["command"][-3]
    assert f"data-plane-port={compose.DATA_PLANE_PORT}" in submitted and 'data-plane-host="0.0.0.0"' in submitted
    assert str(compose.DATA_PLANE_PORT) != loopback != str(commands.SUPERLINK_PORT)
    # The certificate the centres check names what they dial ("superlink") and the loopback the CLI dials.
    assert SERVICES["pki"]["environment"]["SUPERLINK_SANS"] == "DNS:superlink,IP:127.0.0.1"
    assert "control" not in COMPOSE["networks"]  # no network carries the Control API


def test_bundles_run_as_their_own_user_in_compose():
    """Issue 19, threat 3: each SuperNode's app host drops to nobody; its worker's socket is 0660 for nogroup."""
    for centre in CENTRES:
        node, worker = SERVICES[f"supernode-{centre}"]["command"], SERVICES[f"worker-{centre}"]["command"]
        assert node[node.index("--app-user") + 1] == compose.APP_USER
        assert worker[worker.index("--socket-group") + 1] == compose.APP_GROUP


def test_flags_are_accepted_by_flower_and_by_bridgepool(flower_help):
    checked = set()
    for name, svc in SERVICES.items():
        argv = svc.get("command")
        if argv is None:
            continue
        argv = [_default(a) for a in argv]  # what runs when no variable is set
        if name == "prometheus":  # prom/prometheus or Debian's (offline): the same 2.42 flags
            assert svc["entrypoint"] == ["prometheus"]
            done = subprocess.run(["prometheus", "--help"], capture_output=True, text=True)
            usage = done.stdout + done.stderr
            assert flags(argv) and not {f for f in flags(argv) if f not in usage}, argv
            checked.add("prometheus")
            continue
        if argv[:3] == ["bridgepool", "centre", "supernode"]:  # Flower's SuperNode: its flags are Flower's
            ours = {a.dest.replace("_", "-") for a in supernode_parser()._actions}
            unknown = {f for f in flags(argv) if f[2:] not in ours
                       and not re.search(rf"{re.escape(f)}\b", flower_help["flower-supernode"])}
            assert not unknown, (name, unknown)
            checked.add("flower-supernode")
        elif argv[0] == "bridgepool":
            _parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag or value
            checked.add("bridgepool")
        elif argv[:3] == ["python", "-m", "server.fleetgate"]:
            fleetgate.parser().parse_args(argv[3:])  # exits (fails the test) on an unknown flag
            checked.add("fleetgate")
        elif argv[0] == "sh":
            assert argv[1] in ("/app/deploy/pki.sh", "/app/deploy/centre-key.sh"), argv
            assert (ROOT / argv[1].removeprefix("/app/")).is_file()
        else:
            which = next(k for k, v in FLOWER.items() if argv[: len(v)] == v)
            unknown = {f for f in flags(argv) if not re.search(rf"{re.escape(f)}\b", flower_help[which])}
            assert not unknown, (name, which, unknown)
            checked.add(which)
    register = commands.register_supernode("k.pub")  # run by `bridgepool deploy register`
    assert not {f for f in flags(register) if f not in flower_help["flwr supernode register"]}
    assert checked >= {"bridgepool", "flower-superlink", "flower-supernode", "flwr run", "prometheus", "fleetgate"}


def test_ports_agree_across_services():
    port, loopback = commands.SUPERLINK_PORT, compose.SUPERLINK_LOOPBACK_PORT
    superlink = SERVICES["superlink"]["command"]
    assert superlink[superlink.index("--port") + 1] == str(loopback)
    assert f"{loopback}" in SERVICES["superlink"]["healthcheck"]["test"][-1]
    gate = SERVICES["gate"]["command"]
    assert gate[gate.index("--listen") + 1] == f"0.0.0.0:{port}"
    assert f"{port}" in SERVICES["gate"]["healthcheck"]["test"][-1]
    assert gate[gate.index("--upstream") + 1] == f"https://127.0.0.1:{loopback}"
    for centre in CENTRES:
        node = SERVICES[f"supernode-{centre}"]["command"]
        assert node[node.index("--superlink") + 1] == f"superlink:{port}"
    assert f'address = "127.0.0.1:{loopback}"' in (ROOT / compose.FLWR_CONFIG).read_text()
    prom = yaml.safe_load((ROOT / compose.PROMETHEUS_CONFIG).read_text())
    assert f"./{compose.PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro" in SERVICES["prometheus"]["volumes"]
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    worker_ports = {f"worker-{c}:" + (w := SERVICES[f"worker-{c}"]["command"])[w.index("--metrics-port") + 1]
                    for c in CENTRES}
    assert targets == {f"127.0.0.1:{compose.SERVER_METRICS_PORT}"} | worker_ports
    assert f"metrics-port={compose.SERVER_METRICS_PORT}" in SERVICES["submit"]["command"][-3]
    demo = yaml.safe_load(scrape_config(1, {"a": 2}))  # the demo's jobs: the dashboard queries both alike
    assert [j["job_name"] for j in demo["scrape_configs"]] == [j["job_name"] for j in prom["scrape_configs"]]


def test_launchers_and_compose_use_the_same_command_lines(tmp_path):
    """The netns launcher's SuperLink/SuperNode flags are compose's: both come from deploy/commands.py."""
    c = Centre(CENTRES[0], tmp_path / "data", tmp_path / "state")
    fed = NetnsFederation(tmp_path / "run", [c], pki_dir=tmp_path / "pki", app_user=compose.APP_USER)
    node = fed.supernode_argv(c, 9094)
    assert flags(node) == flags(SERVICES[f"supernode-{c.name}"]["command"])
    assert node[node.index("--superlink") + 1].startswith("10.77.0.1:")
    wrapped = fed._wrap(c.name, ["true"])
    assert wrapped[:4] == ["ip", "netns", "exec", fed.namespaces[c.name]] and "unshare" in wrapped
    local = LocalFederation(tmp_path / "run", [c])  # loopback demo: insecure, explicitly
    assert "--insecure" in local.supernode_argv(c, 9094)


def test_insecure_is_an_explicit_opt_in():
    with pytest.raises(commands.InsecureRefused, match="insecure=True"):
        commands.superlink(9093, "db")
    with pytest.raises(commands.InsecureRefused):
        commands.supernode("c", "h:1", "s", 2)
    assert "--insecure" in commands.superlink(9093, "db", insecure=True)
    secure = commands.superlink(9093, "db", commands.Pki(Path("/pki")))
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure


def test_refusals_are_named():
    assert "not registered" in supernode_refusal("Exit Code: 305\n[code: 2004] Failed to activate SuperNode.")
    insecure = "Option `--insecure` was set.\n...\nFailed to initialize the connection to the SuperLink.\n"
    for said in ("Server disconnected without sending a response.", "[Errno 104] Connection reset by peer", ""):
        assert "without TLS" in supernode_refusal(insecure + said), said
    assert "nothing listens" in supernode_refusal(insecure + "[Errno 111] Connection refused")
    # The runtime child, after the refused SuperNode exited, cannot reach the SuperNode's port: not the SuperLink.
    late = "\n2026-12-01 23:11:46,310 WARNING bridgepool.runtime: task poll failed ([Errno 111] Connection refused)"
    assert "without TLS" in supernode_refusal(insecure + "Server disconnected without sending a response." + late)
    assert supernode_refusal("SuperNode ID: 42") is None
