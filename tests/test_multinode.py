"""Topology, end to end with real processes (tiny model, one round): in network namespaces
(root) the run completes across hosts; a centre cannot connect to another centre or read its
data; the server holds no data; everything is removed afterwards. (TLS and SuperNode
authentication against intruders: tests/test_intruders.py.)
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
from pathlib import Path

from deploy.local import Centre, LaunchError
from deploy.netns import NetnsFederation, centre_user, netns_available
from models.config import RunConfig, load_defaults
from tests.conftest import free_base_port, make_centres


def one_round(run_dir: Path, **over) -> RunConfig:
    values = {**load_defaults(), "model": "tiny", "rounds": 1, "inner-steps": 3, "batch-size": 4,
              "inner-warmup-steps": 1, "expected-centres": 2, "threads": 1, "eval-batches": 1,
              "connect-timeout": 120.0, "round-timeout": 180.0, "run-dir": str(run_dir),
              "run-name": run_dir.name, **over}
    return RunConfig.from_mapping(values)


def nsenter(pid: int, argv: list[str], extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run argv inside the network and mount namespaces of the running process `pid` (and those
    `extra` nsenter flags name, e.g. --pid)."""
    return subprocess.run(["nsenter", "--target", str(pid), "--net", "--mount", *extra, "--", *argv],
                          capture_output=True, text=True, timeout=30)


def child(pid: int) -> int:
    """The one child of `unshare --fork` (`pid`): the host's command itself, PID 1 of its PID namespace."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(kids) == 1, (pid, kids)
    return int(kids[0])


# Run inside a centre's namespaces: what its PID 1 and /proc show, and what /proc/1/root and /run/netns reach.
LOOK = """import json, os, sys
other, own = sys.argv[1:]
def cmd(p):
    try:
        return open(f"/proc/{p}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
    except OSError:
        return ""
try:
    os.listdir("/proc/1/root" + other)
    other_data = "listed"
except OSError as err:
    other_data = type(err).__name__
others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
print(json.dumps({"pid-1": cmd(1), "commands": [cmd(p) for p in others],
                  "other-data": other_data, "own-data": os.path.isdir("/proc/1/root" + own),
                  "run-netns": os.listdir("/run/netns") if os.path.isdir("/run/netns") else None}))
"""


def connects(pid: int, host: str, port: int) -> subprocess.CompletedProcess:
    code = f"import socket; socket.create_connection(({host!r}, {port}), 3).close(); print('connected')"
    return nsenter(pid, [sys.executable, "-c", code])


# POST to the coordinator from a centre's namespace, over TLS with the deployment's CA; prints the HTTP status.
ASK = """import http.client, ssl, sys
host, port, ca, path = sys.argv[1:]
conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=ssl.create_default_context(cafile=ca))
conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
print(conn.getresponse().status)
"""


def test_netns_hosts_run_a_federation_and_stay_apart(short_tmp, corpora):
    assert netns_available() is None, netns_available()
    run_dir = short_tmp / "run"  # others may traverse it: the bundles run as 'nobody', as `deploy netns` does
    a, b = make_centres(run_dir, corpora, 2)
    span = free_base_port(4)  # SuperLink, 2 SuperNodes, the data plane
    fed = NetnsFederation(run_dir, [a, b], base_port=span, metrics_port=free_base_port(3), app_user="nobody")
    with fed:
        proc = fed.submit(one_round(run_dir).to_mapping())
        pid = {p.name: p.popen.pid for p in fed.group.procs}
        b_addr, b_metrics = fed.addresses[b.name], fed.centre_metrics_ports()[b.name]

        # Network: the server reaches centre b's metrics endpoint; centre a cannot.
        assert "connected" in connects(pid["SuperLink"], b_addr, b_metrics).stdout
        blocked = connects(pid[f"worker {a.name}"], b_addr, b_metrics)
        assert blocked.returncode != 0 and "connected" not in blocked.stdout, blocked
        assert "connected" in connects(pid[f"worker {a.name}"], fed.addresses["server"], span).stdout

        # Issue 19, threat 1: a centre reaches only the Fleet gate. The SuperLink's own port (Control and
        # Runtime APIs) listens on the server's loopback; through the gate, Control and Runtime paths get 403.
        internal = connects(pid[f"worker {a.name}"], fed.addresses["server"], fed.superlink_internal_port)
        assert internal.returncode != 0 and "connected" not in internal.stdout, internal
        assert "connected" in connects(pid["SuperLink"], "127.0.0.1", fed.superlink_internal_port).stdout
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task", "/docs"):
            asked = nsenter(pid[f"worker {a.name}"], [sys.executable, "-c", ASK, fed.addresses["server"], str(span),
                                                      fed.pki.centre_ca_cert(a.name), path])
            assert asked.stdout.strip() == "403", (path, asked)

        # Issue 19, threat 8: each host's processes are in a PID namespace of their own. From inside centre a's
        # worker (its PID 1): /proc lists only centre a's processes, /proc/1/root is its own hidden tree (not
        # the host's: centre b's data is not there) and /run/netns (the other hosts' namespaces) is empty.
        inside = nsenter(child(pid[f"worker {a.name}"]), [sys.executable, "-c", LOOK, str(b.data_dir),
                                                          str(a.data_dir)], extra=("--pid",))
        seen = json.loads(inside.stdout or "{}")
        assert seen, inside
        assert seen["pid-1"] and "centre serve" in seen["pid-1"] and a.name in seen["pid-1"], seen
        assert not [c for c in seen["commands"] if "flower-superlink" in c or b.name in c], seen["commands"]
        assert seen["other-data"] == "FileNotFoundError" and seen["own-data"] is True, seen
        assert seen["run-netns"] == [], seen
        host_sees = subprocess.run(["ls", "/run/netns"], capture_output=True, text=True).stdout.split()
        assert fed.namespaces[b.name] in host_sees  # the check above is not vacuous

        # Files: a centre reads its own data (read-only), never another centre's or its key.
        for name in (f"worker {a.name}", f"SuperNode {a.name}"):
            assert nsenter(pid[name], ["cat", str(a.data_dir / "manifest.json")]).returncode == 0
            for path in (b.data_dir / "manifest.json", b.state_dir, Path(fed.pki.private_key(b.name))):
                assert nsenter(pid[name], ["ls", str(path)]).returncode != 0, (name, path)
        assert nsenter(pid[f"worker {a.name}"], ["touch", str(a.data_dir / "x")]).returncode != 0

        # Issue 19, threat 8: each centre's worker runs as a user of its own, who owns that centre's data and
        # state. As centre a's user, where no mount hides them (the host's view), centre b's corpus and state
        # are permission denied; root reads them there (so the check is not vacuous).
        users = {c.name: pwd.getpwnam(centre_user(c.name)) for c in (a, b)}
        uid = Path(f"/proc/{child(pid[f'worker {a.name}'])}/status").read_text().split("Uid:")[1].split()[:2]
        assert uid == [str(users[a.name].pw_uid)] * 2, uid  # real and effective
        as_a = ["setpriv", f"--reuid={users[a.name].pw_uid}", f"--regid={users[a.name].pw_gid}", "--clear-groups"]
        for path in (b.data_dir / "manifest.json", b.state_dir, b.state_dir / "flwr-home"):
            denied = subprocess.run([*as_a, "cat" if path.suffix else "ls", str(path)], capture_output=True, text=True)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (path, denied)
        assert subprocess.run(["cat", str(b.data_dir / "manifest.json")], capture_output=True).returncode == 0
        assert subprocess.run([*as_a, "cat", str(a.data_dir / "manifest.json")], capture_output=True).returncode == 0
        for c in (a, b):
            mode = {d.name: (d.stat().st_uid, d.stat().st_mode & 0o777) for d in (c.data_dir, c.state_dir)}
            assert mode == {"data": (users[c.name].pw_uid, 0o700), "state": (users[c.name].pw_uid, 0o710)}, mode

        # The server namespace holds no data files (the host does: the check is not vacuous).
        find = ["find", str(run_dir), "-name", "*.arrow"]
        assert subprocess.run(find, capture_output=True, text=True).stdout.strip()
        seen = nsenter(pid["SuperLink"], find)
        assert seen.returncode == 0 and seen.stdout.strip() == "", seen.stdout

        run = fed.wait(proc, timeout=600)
        pids = [p.popen.pid for p in fed.group.procs]

    assert run["status"] == "finished", run.get("message")
    assert run["rounds"][0]["replied"] == 2
    for c in (a, b):
        # bundles as nobody, in an empty network namespace of their own (clients/appnet.py's default as root)
        assert "as user nobody, no network" in (run_dir / "logs" / f"supernode-{c.name}.log").read_text(), c.name
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in fed.namespaces.values()), listed
    for p in pids:
        assert not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text().lower()


def test_netns_is_torn_down_when_start_fails(tmp_path):
    broken = Centre("fr-genci", tmp_path / "missing-data", tmp_path / "state")  # the worker exits at start-up
    fed = NetnsFederation(tmp_path / "run", [broken], base_port=free_base_port(2))
    try:
        with fed:
            raise AssertionError("started without data")
    except LaunchError as err:
        assert "worker fr-genci" in str(err)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in fed.namespaces.values()), listed
