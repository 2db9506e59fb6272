"""Canary test (issue #5) in the network-namespace topology: TLS + SuperNode auth on, as deployed.

Every centre's corpus holds its own canary in every document (deploy/canary.py's
`plant_canaries`). A real federation runs in `deploy/netns.py`'s topology (server and
centres in network + mount namespaces of their own, 2 centres, tiny model, 1 round) while
tcpdump, inside the server's namespace, captures every frame on the server's side of each
centre's veth link: a centre namespace has no other interface, so that is every byte a
centre exchanges with anything.

With TLS on the captured payload is ciphertext, and a search of it alone would prove
nothing. What makes the capture evidence:

(a) Who talked to whom. Every frame on a centre's link must be TCP between that centre and
    the SuperLink's port or the ServerApp's data plane (which carries the model both ways), ARP
    between the two, or IPv6 link-local housekeeping: no
    centre-to-centre traffic, no other port, no other protocol (`stray_packets`; tcpdump
    itself re-reads each capture and must count the same frames).
(b) What was said. Every Python process of the run logs its TLS session secrets (a
    `sitecustomize` put on PYTHONPATH for this test only sets `keylog_filename` on every
    SSLContext; the bytes sent are unchanged), Wireshark's tshark decrypts every captured
    connection (deploy/tls_decrypt.py; any it cannot decrypt fails the test), and the canary search of
    deploy/canary.py runs on the plaintext (raw streams, HTTP bodies, inflated streams; every
    encoding). The plaintext must hold the round-1 global model byte for byte, so the
    decryption is shown to reach Flower's messages, which is where a leak would travel.
(c) What the coordinator kept: the SuperLink database, checkpoints, run.json and logs.

And it can fail: with the federation still up, centre fr-genci's namespace (a) sends a probe
canary to the SuperLink over TLS, (b) dials the other centre and (c) a second port on the
server. The same checks must then report exactly those: the probe in the decrypted capture,
the ARP for the other centre and the TCP to the other port as strays, and nothing else.
tests/test_canary.py shows a leaking ClientApp's canary in a Flower message is found by the
same search; `test_tshark_decrypts_what_was_sent` below, that decryption is exact and strict.
Run once by hand in this topology with tests/leaky_clientapp.py as the app (2026-11-22):
de-lrz's unguarded leak was found in the decrypted capture (UTF-8, int64 token ids) and in
the SuperLink's database (WAL), not in the raw ciphertext; fr-genci's (guard on) nowhere.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deploy.canary import (
    Capture,
    capture_haystacks,
    files_under,
    plant_canaries,
    read_packets,
    read_pcap,
    search,
    stray_packets,
    stream_haystacks,
    tcp_streams,
)
from deploy.netns import BRIDGE, NetnsFederation, netns_available
from deploy.processes import free_base_port
from deploy.tls_decrypt import TlsError, tls_plaintexts
from models.config import RunConfig, load_defaults
from models.gpt import build_model
from models.packing import pack

CENTRES = ("fr-genci", "de-lrz")
STRAY_PORT = 9  # nothing listens there in the server namespace

# Test-only: every ssl.SSLContext made in a process of the run logs its session secrets.
KEYLOG_HOOK = '''\
import os
import ssl

_path = os.environ.get("BRIDGEPOOL_TEST_KEYLOG")
if _path:
    _new = ssl.SSLContext.__new__

    def _logging_new(cls, *args, **kwargs):
        ctx = _new(cls, *args, **kwargs)
        ctx.keylog_filename = _path
        return ctx

    ssl.SSLContext.__new__ = _logging_new
'''

# Run inside a centre's namespaces: a probe canary to the SuperLink over TLS, then two forbidden dials.
PROBE = '''\
import socket, ssl, sys
server, port, ca, keylog, probe, other, stray = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
ctx.keylog_filename = keylog
body = ("leak " + probe).encode()
with socket.create_connection((server, int(port)), 10) as raw, ctx.wrap_socket(raw, server_hostname=server) as s:
    head = "POST /probe HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n"
    s.sendall((head % len(body)).encode() + body)
    print("probe answered", s.recv(100)[:12])
for host, p in ((other, int(port)), (server, int(stray))):
    try:
        socket.create_connection((host, p), 2).close()
        print("CONNECTED", host, p)
    except OSError as err:
        print("refused", host, p, type(err).__name__)
'''


class CapturedNetns(NetnsFederation):
    """NetnsFederation with tcpdump on the server's end of every centre's link, from the
    moment the links exist until just before the namespaces are deleted."""

    def __init__(self, *args, capture_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.capture_dir = capture_dir
        self.captures: dict[str, Capture] = {}  # centre -> its link's capture
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
        assert sorted(i["ifname"] for i in inside) == ["eth0", "lo"], inside  # one way out, no other
        eth0 = next(i for i in inside if i["ifname"] == "eth0")
        ports = _ip_json(self.namespaces["server"], "link", "show", "master", BRIDGE)
        (port,) = [p for p in ports if p["ifindex"] == eth0["link_index"] and p.get("link_index") == eth0["ifindex"]]
        return port["ifname"]


def _ip_json(ns: str, *args: str) -> list[dict]:
    return json.loads(subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True,
                                     check=True).stdout)


def _nsenter(pid: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "--target", str(pid), "--net", "--mount", "--", *argv],
                          capture_output=True, text=True, timeout=60)


def _config(run_dir: Path) -> RunConfig:
    return RunConfig.from_mapping({
        **load_defaults(), "model": "tiny", "rounds": 1, "inner-steps": 2, "batch-size": 4,
        "inner-warmup-steps": 1, "expected-centres": 2, "threads": 1, "eval-batches": 1,
        "connect-timeout": 120.0, "round-timeout": 180.0, "run-dir": str(run_dir), "run-name": run_dir.name})


def test_netns_canaries_stay_home_and_centres_reach_only_the_superlink(tmp_path, monkeypatch):
    assert netns_available() is None, netns_available()
    run_dir = tmp_path / "run"
    centres, canaries = plant_canaries(run_dir, tmp_path / "src", CENTRES)
    for c in centres:  # the canaries are there to find
        assert {h.canary for h in search(files_under(c.data_dir), canaries)} == {c.name}
    keylog, hook = tmp_path / "tls" / "keys.log", tmp_path / "tls" / "hook"
    hook.mkdir(parents=True)
    (hook / "sitecustomize.py").write_text(KEYLOG_HOOK)
    monkeypatch.setenv("BRIDGEPOOL_TEST_KEYLOG", str(keylog))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    probe = f"probe{secrets.token_hex(12)}"

    # SuperLink, 2 SuperNode runtimes, the ServerApp's data plane (deploy/local.py data_plane_port)
    fed = CapturedNetns(run_dir, centres, base_port=free_base_port(4), capture_dir=tmp_path / "capture")
    a, b = centres
    with fed:
        run = fed.wait(fed.submit(_config(run_dir).to_mapping()), timeout=600)
        # The negative controls, from centre a's namespaces while everything is still up.
        worker_a = next(p.popen.pid for p in fed.group.procs if p.name == f"worker {a.name}")
        server_ip, port = fed.addresses["server"], fed.superlink_port
        done = _nsenter(worker_a, [sys.executable, "-c", PROBE, server_ip, str(port), fed.pki.centre_ca_cert(a.name),
                                   str(keylog), probe, fed.addresses[b.name], str(STRAY_PORT)])
        assert done.returncode == 0 and "probe answered" in done.stdout, done
        assert "CONNECTED" not in done.stdout, done.stdout
    assert run["status"] == "finished", run.get("message")
    assert run["rounds"][0]["replied"] == 2

    ip = {c.name: fed.addresses[c.name] for c in centres}
    streams: dict[str, bytes] = {}
    for c in centres:
        cap = fed.captures[c.name]
        assert cap.dropped == 0, f"tcpdump dropped packets on {c.name}'s link: the capture is incomplete"
        packets = list(read_packets(cap.pcap))
        # tcpdump's own reading of the file counts the same frames: none skipped by our parser.
        listed = subprocess.run(["tcpdump", "-nn", "-r", str(cap.pcap)], capture_output=True, text=True, check=True)
        assert len(listed.stdout.splitlines()) == len(packets)
        # (a) Who talked to whom: the centre and the SuperLink's port, and nothing else but the probes.
        assert sum(p.proto == "tcp" and p.dport == port for p in packets) > 10
        # The data plane carried the model (TLS, to the coordinator only), and counts as the centre's own link.
        assert sum(p.proto == "tcp" and p.dport == fed.data_plane_port for p in packets) > 10
        stray = stray_packets(packets, ip[c.name], server_ip, (port, fed.data_plane_port))
        if c is b:
            assert stray == [], stray
        else:
            to_other = [p for p in stray if (p.proto, p.src, p.dst) == ("arp", ip[a.name], ip[b.name])]
            to_port = [p for p in stray if p.proto == "tcp" and STRAY_PORT in (p.sport, p.dport)]
            assert to_other and to_port and len(to_other) + len(to_port) == len(stray), stray
        streams.update(tcp_streams(read_pcap(cap.pcap)))

    # (b) What was said: every connection on both links decrypts (else TlsError), then the search.
    plain: dict[str, bytes] = {}
    for c in centres:
        plain.update(tls_plaintexts(fed.captures[c.name].pcap, keylog))
    # tshark and our own reassembly agree on every direction of every connection that carried payload.
    assert sorted(n.split("#")[0] for n in plain) == sorted(n.split("#")[0] for n, d in streams.items() if d)
    hay, codings = stream_haystacks(plain, "tls")
    assert codings == {"identity"}  # Flower 1.41 does not compress; a change must be looked at
    ckpt = load_file(run_dir / "checkpoints" / "round-0001" / "model.safetensors")
    model_bytes = pack({k: ckpt[k] for k in build_model("tiny", seed=0).state_dict()}).tobytes()
    for c in centres:  # the round-1 global model reached each centre (on the data plane), as plaintext here
        assert any(model_bytes in data for name, data in plain.items() if f"->{ip[c.name]}:" in name), c.name
        assert any(b"POST /v1/fleet/push-messages" in data for name, data in plain.items()
                   if name.startswith(f"{ip[c.name]}:"))
    for c in centres:
        cipher, _ = capture_haystacks(fed.captures[c.name].pcap)  # the raw bytes too, for completeness
        hay.update({f"{c.name} {k}": v for k, v in cipher.items()})
    found = search(hay, {**canaries, "probe": probe})
    assert found and {h.canary for h in found} == {"probe"}, found  # the probe, caught; no centre's canary
    assert any(h.where.startswith(f"tls {ip[a.name]}:") and h.encoding.startswith("utf-8") for h in found), found

    # (c) What the coordinator kept, in plaintext: database, checkpoints, run.json, logs.
    assert (run_dir / "server" / "superlink.db").exists()
    assert search(files_under(run_dir, exclude=[run_dir / "centres"]), canaries) == []


def test_tshark_decrypts_what_was_sent(tmp_path):
    """tls_plaintexts on a capture of a real TLS 1.3 exchange (Python's ssl, secrets logged):
    exact plaintext both ways; a missing secret, a flipped bit, a stream cut off or a connection
    that is not TLS fails loudly instead of leaving a connection unsearched."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    keylog = tmp_path / "keys.log"
    client_ctx.keylog_filename = str(keylog)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    sent: list[tuple[bool, bytes]] = []  # (from the client, bytes), in the order sent

    def pump() -> None:
        for src, dst, from_client in ((c_out, s_in, True), (s_out, c_in, False)):
            if data := src.read():
                sent.append((from_client, data))
                dst.write(data)

    for _ in range(10):  # the handshake
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        pump()
    up, down = b"canary up " * 5000, b"canary down " * 3
    client.write(up)
    pump()
    got = b""
    while len(got) < len(up):
        got += server.read(1 << 16)
    server.write(down)
    pump()
    assert client.read(1 << 16) == down and client.version() == "TLSv1.3"

    tls = (("10.0.0.2", 40000), ("10.0.0.1", 443), sent)
    pcap = _write_pcap(tmp_path / "tls.pcap", [tls])
    plain = tls_plaintexts(pcap, keylog)
    assert plain == {"10.0.0.2:40000->10.0.0.1:443#0": up, "10.0.0.1:443->10.0.0.2:40000#0": down}
    assert sorted(n.split("#")[0] for n in plain) == sorted(n.split("#")[0] for n, d in
                                                           tcp_streams(read_pcap(pcap)).items() if d)
    (tmp_path / "other.log").write_text("")
    with pytest.raises(TlsError, match="no session secrets"):
        tls_plaintexts(pcap, tmp_path / "other.log")
    last = max(i for i, (from_client, _) in enumerate(sent) if from_client)  # the client's data records
    flipped = bytearray(sent[last][1])
    flipped[-20] ^= 1
    for changed, match in ((bytes(flipped), "does not authenticate"), (sent[last][1][:-100], "cut off")):
        bad = (tls[0], tls[1], [*sent[:last], (True, changed), *sent[last + 1:]])
        with pytest.raises(TlsError, match=match):
            tls_plaintexts(_write_pcap(tmp_path / "bad.pcap", [bad]), keylog)
    http = (("10.0.0.2", 40001), ("10.0.0.1", 80), [(True, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")])
    with pytest.raises(TlsError, match="0 of them in whole TLS records"):
        tls_plaintexts(_write_pcap(tmp_path / "mixed.pcap", [tls, http]), keylog)


def _write_pcap(path: Path, conns: list[tuple[tuple[str, int], tuple[str, int], list[tuple[bool, bytes]]]]) -> Path:
    """A classic pcap (Ethernet, IPv4, TCP) of each (client, server, [(from client, bytes)]) connection:
    the TCP handshake, then the bytes in segments of at most 1448 in the order sent (checksums 0)."""
    frames = []
    for client, server, chunks in conns:
        seq = {True: 1000, False: 5000}
        segments = [(True, 0x02, b""), (False, 0x12, b""), (True, 0x10, b"")]  # SYN; SYN, ACK; ACK
        segments += [(c, 0x18, data[i:i + 1448]) for c, data in chunks for i in range(0, len(data), 1448)]  # PSH, ACK
        for from_client, flags, payload in segments:
            (src, sport), (dst, dport) = (client, server) if from_client else (server, client)
            tcp = struct.pack(">HHIIBBHHH", sport, dport, seq[from_client], seq[not from_client] if flags & 0x10 else 0,
                              5 << 4, flags, 65535, 0, 0)
            ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
                             socket.inet_aton(src), socket.inet_aton(dst))
            frames.append(b"\2\0\0\0\0\1\2\0\0\0\0\2\x08\x00" + ip + tcp + payload)
            seq[from_client] += len(payload) + bool(flags & 0x02)  # a SYN takes one sequence number
    with path.open("wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))  # link type 1: Ethernet
        for i, frame in enumerate(frames):
            fh.write(struct.pack("<IIII", 1_700_000_000, i, len(frame), len(frame)) + frame)
    return path


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
