"""docker-compose.yml brought up for real (issue 17), in a private Docker engine.

The image is built offline (deploy/images.py: debootstrap base, cached wheels, Debian's
Prometheus); the 3-centre federation runs with the tiny model and a quorum of 2 of 3. While it
runs, Prometheus (in compose) must scrape every target and see training tokens; then one
centre's containers are `docker kill`ed, the run must go on without it, and `docker start`
brings it back into a later round. After the run: residency of the volumes (docker inspect, and
reads attempted from inside the containers), an unregistered SuperNode key refused, and
`down -v` leaving nothing. Skipped, with the reason, only where no Docker engine can start.
Build and run times are printed (-s), not asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from deploy import commands, compose, dockerup, images
from deploy.processes import free_base_port
from deploy.register import supernode_refusal
from tests.docker_engine import EngineUnavailable, PrivateEngine

PROJECT = "bptest"
CENTRES = [name for name, _ in compose.centres_and_sources()]
VICTIM = CENTRES[-1]
# Rounds on a time budget (round-seconds), so that a run lasts as long on a fast host as on a slow one:
# with a fixed inner-steps=5 a round took 0.6 s on a fast host, and the 8 rounds left after the killed
# centre's ~50 s absence closed in 5 s, before its restarted SuperNode had registered. 20 rounds of
# >= 2 s leave it ~25 s to rejoin.
ROUNDS = 20
RUN_CONFIG = (f'model="tiny" rounds={ROUNDS} round-seconds=2.0 min-inner-steps=2 max-inner-steps=400 '
              'batch-size=8 inner-lr=1e-2 inner-warmup-steps=5 '
              'threads=1 eval-batches=2 min-centres=2 round-timeout=60.0 connect-timeout=300.0')
SERVER_SIDE = ["superlink", "register", "submit", "prometheus"]


@pytest.fixture(scope="module")
def engine():
    eng = PrivateEngine()
    try:
        eng.start()
    except EngineUnavailable as why:
        # Not a skip: the suite's promise includes the real compose bring-up (.ci/run installs the engine).
        pytest.fail(f"no Docker engine can start here: {why}; install Debian's docker.io, docker-compose and "
                    "debootstrap as root (`sh deploy/install-system-packages.sh docker`, as .ci/run does)")
    try:
        yield eng
    finally:
        eng.stop()


def _prometheus(c: dockerup.Compose, path: str) -> dict:
    """Prometheus's HTTP API, asked from inside the SuperLink's network namespace (Prometheus's own)."""
    code = ("import sys, urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:9090' + sys.argv[1], timeout=5).read().decode())")
    done = c.docker_cmd("exec", c.container("superlink"), "python", "-c", code, path, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def _run_json(c: dockerup.Compose) -> dict:
    raw = c.read("superlink", f"{dockerup.RUN_DIR}/run.json")
    return json.loads(raw) if raw else {}


def _accepted(r: dict, centre: str) -> bool:
    return centre in r["centres"] and centre not in r.get("failed", {})


def _watch(c: dockerup.Compose, seen: dict, timeout: float) -> None:
    """Poll run.json; Prometheus checks after round 1, then kill the victim, then restart it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and c.state("submit")["Status"] != "exited":
        rounds = _run_json(c).get("rounds", [])
        done = rounds[-1]["round"] if rounds else 0
        if done >= 1 and "targets" not in seen:
            targets = _prometheus(c, "/api/v1/targets").get("data", {}).get("activeTargets", [])
            tokens = _prometheus(c, "/api/v1/query?query=sum(bridgepool_tokens_total)")
            value = float((tokens.get("data", {}).get("result") or [{"value": [0, "0"]}])[0]["value"][1])
            seen["last-prometheus"] = (targets, value)
            if len(targets) == 1 + len(CENTRES) and all(t["health"] == "up" for t in targets) and value > 0:
                seen["targets"], seen["tokens"] = targets, value
        elif "targets" in seen and "killed" not in seen:
            for svc in (f"supernode-{VICTIM}", f"worker-{VICTIM}"):
                c.docker_cmd("kill", c.container(svc))
            seen["killed"], seen["killed-at"] = done, time.time()
        elif "killed" in seen and "restarted" not in seen and any(
                r["round"] > seen["killed"] and not _accepted(r, VICTIM) for r in rounds):
            # A round closed without the victim: bring it back, the worker first (the SuperNode's
            # ClientApp relays to the worker's socket).
            c.docker_cmd("start", c.container(f"worker-{VICTIM}"))
            _wait_healthy(c, f"worker-{VICTIM}")
            c.docker_cmd("start", c.container(f"supernode-{VICTIM}"))
            seen["restarted"], seen["restarted-after"] = time.time(), done
        time.sleep(2)


def _wait_healthy(c: dockerup.Compose, service: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.state(service).get("Health", {}).get("Status") == "healthy":
            return
        time.sleep(1)
    raise TimeoutError(f"{service} not healthy after restart")


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    """Build, up, run with the kill and restart, then yield what was seen; `down -v` at the end."""
    ports = free_base_port(2)
    env = {"DOCKER_HOST": engine.env["DOCKER_HOST"],
           **dockerup.up_env(True, RUN_CONFIG, {"PROMETHEUS_PORT": ports, "GRAFANA_PORT": ports + 1,
                                                 "BRIDGEPOOL_MAX_BYTES": 200_000})}
    c = dockerup.Compose(PROJECT, env, docker=engine.docker)
    seen: dict = {"compose": " ".join(c.argv[:-4])}
    t0 = time.monotonic()
    images.build(engine.docker, offline=True, env=engine.env)
    seen["build-s"] = time.monotonic() - t0
    seen["image-bytes"] = int(c.docker_cmd("image", "inspect", "--format", "{{.Size}}", images.IMAGE).stdout)
    t1 = time.monotonic()
    try:
        dockerup.start(c, offline=True)
        _watch(c, seen, timeout=1500)
        seen["exit"] = dockerup.wait_submit(c, timeout=300)
        seen["run-s"] = time.monotonic() - t1
        seen["run"] = _run_json(c)
        seen["out"] = dockerup.collect(c, tmp_path_factory.mktemp("compose-run"))
        # Every service's log, kept past `down -v` (a failed round is read from these)
        logs = Path(seen["out"]) / "compose-logs.txt"
        logs.write_text(c("logs", "--no-color", "--timestamps", timeout=300, check=False).stdout)
        print(f"\ncompose test: image built in {seen['build-s']:.0f}s, {seen['image-bytes'] / 1e6:.0f} MB; "
              f"up + run {seen['run-s']:.0f}s; killed {VICTIM} after round {seen.get('killed')}, restarted "
              f"after round {seen.get('restarted-after')}; logs: {logs}")
        yield c, seen
    finally:
        if "down" not in seen:  # a failed check: still leave nothing behind
            logs = c("logs", "--no-color", "--tail", "40", timeout=120, check=False)
            print(logs.stdout[-6000:])
            c("down", "-v", "--remove-orphans", timeout=300, check=False)


def test_compose_file_is_valid_for_this_compose(stack):
    """The Compose that ran it accepts the file without a warning; so does v2, where it is installed."""
    c, seen = stack
    done = c("config", "-q")
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    v2 = subprocess.run([c.docker, "compose", "version"], capture_output=True, env=c.env)
    if v2.returncode == 0 and c.argv[0] != c.docker:
        done = subprocess.run([c.docker, "compose", *c.argv[1:], "config", "-q"], capture_output=True, text=True,
                              env=c.env)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_run_has_every_round_and_the_loss_falls(stack):
    _, seen = stack
    run = seen["run"]
    # A string, not a tuple: pytest prints it whole (a tuple's repr is cut to ~240 characters, and
    # with it the reasons the centres failed), followed by what the services logged as going wrong.
    assert seen["exit"] == 0 and run["status"] == "finished", (
        f"submit exited {seen['exit']}, run {run.get('status')}: {run.get('message')}\n{_trouble(seen)}")
    assert [r["round"] for r in run["rounds"]] == list(range(1, ROUNDS + 1))
    first, final = run["rounds"][0]["eval-loss-mean"], run["final"]["eval-loss-mean"]  # round 1: ~ln(256)
    assert final < first - 0.5, [r["eval-loss-mean"] for r in run["rounds"]] + [final]


def _trouble(seen: dict, lines: int = 60) -> str:
    """The last warnings, errors and tracebacks of every service's log (kept by the `stack` fixture)."""
    logs = Path(seen["out"]) / "compose-logs.txt"
    text = logs.read_text(errors="replace").splitlines() if logs.is_file() else []
    bad = [line for line in text if re.search(r"WARNING|ERROR|Error|Traceback|refused|failed", line)]
    return "\n".join(bad[-lines:])


def test_prometheus_scraped_every_target_and_saw_tokens(stack):
    _, seen = stack
    assert "targets" in seen, seen.get("last-prometheus")
    jobs = {(t["labels"]["job"], t["labels"].get("centre_endpoint")) for t in seen["targets"]}
    assert jobs == {("bridgepool-server", None), *{("bridgepool-centres", c) for c in CENTRES}}
    assert seen["tokens"] > 0


def test_killed_centre_did_not_stop_the_run_and_rejoined(stack):
    _, seen = stack
    rounds = seen["run"]["rounds"]
    assert "killed" in seen and "restarted" in seen, {k: seen.get(k) for k in ("killed", "restarted")}
    without = [r["round"] for r in rounds if r["round"] > seen["killed"] and not _accepted(r, VICTIM)]
    assert without, "no round closed without the killed centre"
    assert all(len([n for n in CENTRES if _accepted(r, n)]) >= 2 for r in rounds)  # the quorum held
    back = [r["round"] for r in rounds if r["time"] > seen["restarted"] and _accepted(r, VICTIM)]
    assert back, f"{VICTIM} never came back after docker start"
    print(f"\n{VICTIM}: killed after round {seen['killed']}, rounds without it {without}, back in rounds {back}")


def test_each_centre_sees_only_its_own_data(stack):
    c, _ = stack
    volumes = {v: json.loads(c.docker_cmd("volume", "inspect", f"{PROJECT}_{v}").stdout)[0]["Mountpoint"]
               for v in (f"data-{n}" for n in CENTRES)}
    running = [s for s in c.services() if s not in dockerup.OFFLINE_SKIP]
    for service in running:
        mounts = json.loads(c.docker_cmd("inspect", "--format", "{{json .Mounts}}", c.container(service)).stdout)
        data = {m["Name"].removeprefix(f"{PROJECT}_") for m in mounts if m["Type"] == "volume"} & set(volumes)
        # only a centre's data preparation and its worker mount its corpus; its key and SuperNode do not
        owner = next((n for n in CENTRES if service in (f"prep-{n}", f"worker-{n}")), None)
        assert data == ({f"data-{owner}"} if owner else set()), (service, data)
    for name in CENTRES:  # from inside: its own corpus readable, another centre's volume not there
        worker = c.container(f"worker-{name}")
        own = c.docker_cmd("exec", worker, "cat", "/data/corpus/manifest.json").stdout
        assert own == (Path(volumes[f"data-{name}"]) / "corpus" / "manifest.json").read_text()
        for other, path in volumes.items():
            if other != f"data-{name}":
                probe = c.docker_cmd("exec", worker, "cat", f"{path}/corpus/manifest.json", check=False)
                assert probe.returncode != 0 and "No such file" in probe.stderr, (name, other, probe.stdout[:200])
    for service in ("superlink", *(f"supernode-{n}" for n in CENTRES)):
        probe = c.docker_cmd("exec", c.container(service), "sh", "-c",
                             "ls /data; " + "; ".join(f"ls {p}" for p in volumes.values()), check=False)
        assert probe.returncode != 0 and probe.stdout.strip() == "", (service, probe.stdout[:300])


def test_an_unregistered_key_is_refused(stack):
    c, _ = stack
    network = f"{PROJECT}_centre-{CENTRES[0]}"
    rogue = ("ssh-keygen -q -t ecdsa -b 384 -N '' -f /tmp/rogue.key && exec flower-supernode "
             "--root-certificates /pki/public/ca.crt --auth-supernode-private-key /tmp/rogue.key "
             "--superlink superlink:9093 --max-retries 1 --isolation process")
    done = c.docker_cmd("run", "--rm", "--network", network, "-v", f"{PROJECT}_pki-public:/pki/public:ro",
                        images.IMAGE, "sh", "-c", rogue, timeout=180, check=False)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "not registered" in (supernode_refusal(log) or ""), log[-1500:]


# Run inside a centre's container: its POSTs to the coordinator through the Fleet gate (TLS, the deployment's
# CA), then a plain TCP connection to the SuperLink's own port. Prints {path: status, "own-port": outcome}.
ATTACK = """import json, socket, ssl, sys, urllib.error, urllib.request
gate, own, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx, seen = ssl.create_default_context(cafile=ca), {}
for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run",
             "/v1/runtime/acquire-task", "/docs"):
    ask = urllib.request.Request(gate + path, data=b"", method="POST", headers={"Content-Type": "application/protobuf"})
    try:
        seen[path] = urllib.request.urlopen(ask, context=ctx, timeout=10).status
    except urllib.error.HTTPError as err:
        seen[path] = err.code
try:
    socket.create_connection(("superlink", own), 5).close()
    seen["own-port"] = "connected"
except OSError as err:
    seen["own-port"] = type(err).__name__
print(json.dumps(seen))
"""


def test_a_centre_reaches_only_the_fleet_api(stack):
    """Issue 19, threat 1 in compose: from inside a centre's SuperNode container, the coordinator's Control and
    Runtime APIs answer 403 through the gate, and the SuperLink's own port refuses the connection (it binds
    127.0.0.1 of its namespace). The run above went through the same gate (its Fleet API)."""
    c, _ = stack
    for name in CENTRES[:2]:
        done = c.docker_cmd("exec", c.container(f"supernode-{name}"), "python", "-c", ATTACK,
                            f"https://superlink:{commands.SUPERLINK_PORT}", str(compose.SUPERLINK_LOOPBACK_PORT),
                            "/pki/public/ca.crt", check=False)
        assert done.returncode == 0, done.stderr[-1500:]
        seen = json.loads(done.stdout)
        assert seen.pop("own-port") == "ConnectionRefusedError", (name, done.stdout)
        assert set(seen.values()) == {403}, (name, seen)
    refused = c("logs", "--no-color", "gate", timeout=120, check=False).stdout
    assert "refused POST /v1/control/list-runs" in refused, refused[-1500:]
    # The refusal is the binding's, not an empty port: in the SuperLink's own namespace the port is open.
    port = compose.SUPERLINK_LOOPBACK_PORT
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), 5); print('open')"
    own = c.docker_cmd("exec", c.container("superlink"), "python", "-c", code, check=False)
    assert own.stdout.strip() == "open", own.stderr[-800:]


# Run inside a centre's SuperNode container: each app host process (clients/apphost.py) with its real and
# effective uid (its /proc/PID/ns is closed to the container's root: it lacks CAP_SYS_PTRACE). Prints
# {"nobody": uid, "hosts": [...]}.
APP_HOSTS = """import json, os, pwd
hosts = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        uids = next(line.split()[1:3] for line in open(f"/proc/{pid}/status") if line.startswith("Uid:"))
    except OSError:  # exited meanwhile
        continue
    if b"clients.apphost" in argv:
        hosts.append({"pid": int(pid), "uids": [int(u) for u in uids]})
print(json.dumps({"nobody": pwd.getpwnam("nobody").pw_uid, "hosts": hosts}))
"""


def test_bundles_ran_as_nobody_and_the_network_is_as_logged(stack):
    """Issue 19, threat 3 in compose: in every centre's SuperNode container the app hosts that ran the submitted
    bundle run as nobody (real and effective uid, read from /proc), as the runtime logged. The containers get no
    CAP_SYS_ADMIN (deploy/compose.py), so `--app-network auto` must fall back to the container's network and say
    why, and no app host may claim a namespace of its own (README's row 3 says compose does not defend this)."""
    c, _ = stack
    for name in CENTRES:
        done = c.docker_cmd("exec", c.container(f"supernode-{name}"), "python", "-c", APP_HOSTS, check=False)
        assert done.returncode == 0, (name, done.stderr[-1500:])
        seen = json.loads(done.stdout)
        assert seen["hosts"], (name, "no app host process: the bundle never ran here?")
        assert all(h["uids"] == [seen["nobody"]] * 2 for h in seen["hosts"]), (name, seen)
        log = c("logs", "--no-color", f"supernode-{name}", timeout=120, check=False).stdout
        started = re.findall(r"app host pid \d+ for bundle .*", log)
        assert started and all(line.endswith(f"as user {compose.APP_USER}") for line in started), (name, started)
        assert "submitted bundles share this centre's network" in log and "CAP_SYS_ADMIN" in log, (name, log[-1500:])


def test_down_leaves_nothing(stack):
    c, seen = stack
    c("down", "-v", "--remove-orphans", timeout=300)
    seen["down"] = True
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in (["ps", "-aq"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
        assert c.docker_cmd(*kind, "--filter", label).stdout.strip() == "", kind
    names = c.docker_cmd("volume", "ls", "--format", "{{.Name}}").stdout.split() + \
        c.docker_cmd("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in names if n.startswith(f"{PROJECT}_")], names
