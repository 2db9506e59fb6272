"""Canary test (issues #5, #16) in the network-namespace topology, through `bridgepool verify residency`.

`bridgepool verify residency --topology netns --leak-probe` builds deploy/netns.py's topology (server
and centres in network + mount namespaces of their own, TLS + SuperNode auth on, 2 centres, tiny
model, 1 round), plants a canary in each centre's corpus copy, and has tcpdump, inside the server's
namespace, capture every frame on the server's side of each centre's veth link: a centre namespace
has no other interface, so that is every byte a centre exchanges with anything.

With TLS on the captured payload is ciphertext, and a search of it alone would prove nothing. What
makes the capture evidence (deploy/residency/verify.py):
(a) Who talked to whom: every frame on a centre's link must be TCP between that centre and the
    SuperLink's port or the ServerApp's data plane (which carries the model both ways), ARP between
    the two, or IPv6 link-local housekeeping (`stray_packets`; tcpdump re-reads each capture and must
    count the same frames).
(b) What was said: every process of the run logs its TLS session secrets (deploy/residency/tls.py's
    key-log hook), tshark decrypts every captured connection (any it cannot decrypt is reported), and
    the canary search runs on the plaintext. The plaintext must hold the round-1 global model byte for
    byte and the run's name on each link (the public markers).
(c) What the coordinator kept: the SuperLink database, checkpoints, run.json and logs.

And it can fail: with the federation still up, `--leak-probe` has centre fr-genci's namespace send a
probe canary to the SuperLink over TLS, dial the other centre and a closed port on the server. The
verdict must then be LEAK, naming exactly those: the probe in the decrypted capture, the ARP for
the other centre and the TCP to the other port as strays, and nothing else: no centre's own canary
anywhere. tests/test_canary.py shows a leaking app's canary in a Flower message is found by the
same command on loopback; `test_tshark_decrypts_what_was_sent` below, that decryption is exact and strict.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import struct
from pathlib import Path

import pytest

from deploy.cli import main
from deploy.netns import netns_available
from deploy.residency.capture import read_pcap, tcp_streams
from deploy.residency.tls import TlsError, tls_plaintexts
from deploy.residency.topology import STRAY_PORT

CENTRES = ("fr-genci", "de-lrz")


def test_netns_verify_residency_catches_the_leak_probe_and_nothing_else(short_tmp):
    assert netns_available() is None, netns_available()
    out = short_tmp / "evidence"
    rc = main(["verify", "residency", "--topology", "netns", "--leak-probe", "--max-bytes", "20000",
               "--out", str(out)])
    rep = json.loads((out / "report.json").read_text())
    assert (rc, rep["verdict"]) == (1, "LEAK"), rep["verdict-reason"]
    assert rep["method"] == "netns" and rep["run"]["status"] == "finished" and rep["run"]["rounds"] == 1
    assert rep["problems"] == [], rep["problems"]  # every frame kept and parsed, every connection decrypted
    a, b = CENTRES
    for name in CENTRES:
        link = rep["links"][name]
        assert link["dropped"] == 0 and link["tcpdump-recount"] == link["frames"]
        # The centre talked to the SuperLink and to the data plane (which carried the model), over TLS.
        assert link["to-coordinator-frames"]["superlink"] > 10 and link["to-coordinator-frames"]["data-plane"] > 10
        assert link["connections-decrypted"] >= 2
    # (b) the controls: the round-1 global model and the run's name in the plaintext of both links.
    for marker in ("round-1 global model bytes", "run name"):
        assert rep["markers"][marker]["found-in"] == sorted(CENTRES), rep["markers"]
    assert rep["content-encodings"] == ["identity"]

    # The probe, caught in the decrypted capture of fr-genci's link; no centre's canary anywhere.
    hits = rep["searches"]["capture"]["hits"]
    assert hits and {h["canary"] for h in hits} == {f"probe ({a})"}, hits
    assert all(h["where"].startswith(f"{a}: ") for h in hits)
    assert any(h["encoding"].startswith("utf-8") and " tls " in f" {h['where']}" for h in hits), hits
    assert rep["searches"]["coordinator-files"]["hits"] == []
    assert any(f.endswith("server/superlink.db") for f in rep["searches"]["coordinator-files"]["files"])
    # (a) strays: fr-genci's ARP for de-lrz and its TCP to the closed port, and nothing else; de-lrz clean.
    assert rep["links"][b]["strays"] == []
    strays = rep["links"][a]["strays"]
    ips = {n: rep["links"][n]["address"] for n in CENTRES}
    to_other = [p for p in strays if (p["proto"], p["src"], p["dst"]) == ("arp", ips[a], ips[b])]
    to_port = [p for p in strays if p["proto"] == "tcp" and STRAY_PORT in (p["sport"], p["dport"])]
    assert to_other and to_port and len(to_other) + len(to_port) == len(strays), strays
    assert "LEAK" in (out / "report.md").read_text() and rep["integrity"]["tls-key-log"]["sha256"]


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
