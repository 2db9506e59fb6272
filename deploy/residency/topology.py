"""The verification federation, captured: netns (one link per centre, TLS) or loopback (one interface).

- `CapturedNetns`: deploy/netns.py's topology (server and each centre in network + mount
  namespaces of their own, TLS and SuperNode authentication on) with tcpdump, inside the server's
  namespace, on the server's end of every centre's veth link, from the moment the links exist until
  just before the namespaces are deleted. A centre namespace has no other interface, so that is
  every byte a centre exchanges with anything.
- `CapturedLoopback`: deploy/local.py's processes on one host (plain HTTP), tcpdump on `lo` for the
  federation's ports (SuperLink, SuperNode runtimes, the ServerApp's data plane). All centres
  share the interface, so there is one capture and no per-centre "who talked to whom" check.

`leak_probe` is the positive control `--leak-probe` asks for: from a centre's side it sends a
probe canary to the SuperLink (over TLS in netns), and in netns also dials the other centre and a
closed port on the server, which the checks must then report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploy.local import Centre, LocalFederation
from deploy.netns import BRIDGE, NetnsFederation
from deploy.residency.capture import Capture

STRAY_PORT = 9  # nothing listens there in the server namespace (the probe's forbidden dial)

# Run inside a centre's namespaces: a probe canary to the SuperLink over TLS, then two forbidden dials.
PROBE = '''\
import socket, ssl, sys
server, port, ca, probe, other, stray = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca) if ca else None
body = ("leak " + probe).encode()
head = "POST /probe HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n"
with socket.create_connection((server, int(port)), 10) as raw:
    s = ctx.wrap_socket(raw, server_hostname=server) if ctx else raw
    s.sendall((head % len(body)).encode() + body)
    print("probe answered", s.recv(100)[:12])
for host, p in ((other, int(port)), (server, int(stray))):
    if not host or not p:
        continue
    try:
        socket.create_connection((host, p), 2).close()
        print("CONNECTED", host, p)
    except OSError as err:
        print("refused", host, p, type(err).__name__)
'''


class CapturedNetns(NetnsFederation):
    """NetnsFederation with tcpdump on the server's end of every centre's link."""

    method = "netns"

    def __init__(self, *args: Any, capture_dir: Path, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.capture_dir = capture_dir
        self.captures: dict[str, Capture] = {}  # link name (the centre) -> its capture
        self.links: dict[str, str] = {}  # centre -> bridge port (server namespace)
        self._running: list[str] = []

    def create_network(self) -> None:
        super().create_network()
        for c in self.centres:
            self.links[c.name] = self.link_of(c.name)
            cap = Capture(self.capture_dir / f"{c.name}.pcap", [], iface=self.links[c.name],
                          netns=self.namespaces["server"])
            self.captures[c.name] = cap.__enter__()
            self._running.append(c.name)

    def delete_network(self) -> None:
        try:
            while self._running:  # stopped before the links go: tcpdump flushes and counts drops
                self.captures[self._running.pop()].__exit__(None, None, None)
        finally:
            super().delete_network()

    def link_of(self, centre: str) -> str:
        """The bridge port whose veth peer is the centre's only interface besides lo."""
        inside = _ip_json(self.namespaces[centre], "link", "show")
        if sorted(i["ifname"] for i in inside) != ["eth0", "lo"]:  # one way out, no other
            raise RuntimeError(f"centre {centre}'s namespace has interfaces {inside}; expected eth0 and lo only")
        eth0 = next(i for i in inside if i["ifname"] == "eth0")
        ports = _ip_json(self.namespaces["server"], "link", "show", "master", BRIDGE)
        (port,) = [p for p in ports if p["ifindex"] == eth0["link_index"] and p.get("link_index") == eth0["ifindex"]]
        return port["ifname"]

    def leak_probe(self, centre: str, other: str, probe: str) -> str:
        """The probe from `centre`'s namespaces (its worker's), while everything is up."""
        assert self.pki is not None
        pid = next(p.popen.pid for p in self.group.procs if p.name == f"worker {centre}")
        argv = [sys.executable, "-c", PROBE, self.addresses["server"], str(self.superlink_port),
                self.pki.centre_ca_cert(centre), probe, self.addresses[other] if other else "", str(STRAY_PORT)]
        done = subprocess.run(["nsenter", "--target", str(pid), "--net", "--mount", "--", *argv],
                              capture_output=True, text=True, timeout=60)
        return (done.stdout + done.stderr).strip()


class CapturedLoopback(LocalFederation):
    """LocalFederation (plain HTTP on 127.0.0.1) with tcpdump on `lo` for its ports."""

    method = "loopback"

    def __init__(self, run_dir: Path, centres: list[Centre], base_port: int, capture_dir: Path):
        super().__init__(run_dir, centres, base_port=base_port, durable_superlink=True)  # the DB is searched
        ports = list(range(base_port, self.data_plane_port + 1))  # SuperLink, SuperNode runtimes, data plane
        self.captures = {"lo": Capture(capture_dir / "loopback.pcap", ports)}
        self.links = {"lo": "lo"}

    def __enter__(self) -> CapturedLoopback:
        self.captures["lo"].__enter__()
        try:
            super().__enter__()
        except BaseException:
            self.captures["lo"].__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self.captures["lo"].__exit__(None, None, None)

    def leak_probe(self, centre: str, other: str, probe: str) -> str:
        """The probe from this host (every centre's host here), plain HTTP as the federation's."""
        done = subprocess.run([sys.executable, "-c", PROBE, "127.0.0.1", str(self.superlink_port), "", probe, "", "0"],
                              capture_output=True, text=True, timeout=60)
        return (done.stdout + done.stderr).strip()


def recorded_fab_hashes(fed: LocalFederation) -> list[str]:
    """The FAB hash of each run the SuperLink holds, as `flwr ls --format json` (Flower's public CLI)
    reports it, asked from the coordinator's host while the federation is up."""
    from deploy.processes import venv_bin

    argv = fed._wrap("server", [venv_bin("flwr"), "ls", "bridgepool", "--format", "json"])
    done = subprocess.run(argv, capture_output=True, text=True, env=fed._env(fed.server_home), cwd=fed.run_dir,
                          timeout=180)
    try:
        return [str(r["fab-hash"]) for r in json.loads(done.stdout)["runs"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        return []


def _ip_json(ns: str, *args: str) -> list[dict]:
    return json.loads(subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True,
                                     check=True).stdout)
