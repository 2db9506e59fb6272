"""Canary search: does any planted data string appear in captured traffic or on the server's disk?

A centre's corpus gets unique canary strings; the federation runs while `tcpdump`
captures every byte between its processes; afterwards the capture (TCP streams
reassembled, HTTP bodies de-chunked and decoded, compressed streams inflated) and
the server's files are searched for each canary in every encoding the system could
carry it in: UTF-8 (= byte-level token ids as uint8), token ids as int16/int32/
int64 and float32/float64 (little- and big-endian), and base64 of the UTF-8.

Flower 1.41 sends protobuf over HTTP/1.1 without compression (its client sets no
content-encoding and its server has no compression middleware); `find_compressed`
still inflates any gzip/zlib stream found, and `http_messages` reports every
content-encoding seen, so a later Flower that compresses is caught, not missed.

For the network-namespace topology (TLS on), `read_packets` and `stray_packets` check
who talked to whom on a centre's link, and deploy/tls_decrypt.py (Wireshark's tshark) decrypts
the captured TLS with the session keys the processes logged, so the same search runs on the plaintext.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clients.data import prepare_centre
from deploy.local import Centre, centre_dirs


@dataclass(frozen=True)
class Hit:
    canary: str  # the planting centre's label
    encoding: str
    where: str


# ------------------------------------------------------------------- planting
FILLER = ("Ordinary prose follows so that the tiny model has something to learn from. " * 4).strip()


def plant_canaries(run_dir: Path, src: Path, names: Iterable[str],
                   docs: int = 30) -> tuple[list[Centre], dict[str, str]]:
    """Each centre's corpus (prepared into `run_dir`'s layout, deploy/local.py): `docs` small
    documents written under `src/NAME`, each holding that centre's own random canary once.
    Returns the centres and their canaries (centre name -> canary)."""
    centres, canaries = [], {}
    for name in names:
        canary = f"canary{secrets.token_hex(12)}"
        folder = Path(src) / name
        folder.mkdir(parents=True)
        for i in range(docs):
            (folder / f"{i:03d}.txt").write_text(f"Record {i} of {name}: reference {canary}. {FILLER}\n")
        c = centre_dirs(run_dir, name)
        prepare_centre(str(folder), c.data_dir)
        centres.append(c)
        canaries[name] = canary
    return centres, canaries


# ------------------------------------------------------------------ encodings
def encodings(canary: str) -> dict[str, bytes]:
    """`canary` as the bytes each carrier would hold (byte-level tokens: id = UTF-8 byte)."""
    raw = canary.encode("utf-8")
    ids = np.frombuffer(raw, dtype=np.uint8)
    out = {"utf-8 / uint8 token ids": raw}
    for dtype in ("int16", "int32", "int64", "float32", "float64"):
        for order, tag in (("<", "le"), (">", "be")):
            out[f"{dtype}-{tag} token ids"] = ids.astype(np.dtype(dtype).newbyteorder(order)).tobytes()
    for shift in range(3):  # base64 depends on the text's alignment: all three, cut to the characters
        enc = base64.b64encode(b"\0" * shift + raw)  # whose 6 bits come from the canary alone
        out[f"base64 (offset {shift})"] = enc[-(-8 * shift // 6):8 * (shift + len(raw)) // 6]
    return out


def search(haystacks: Mapping[str, bytes], canaries: Mapping[str, str]) -> list[Hit]:
    """Every (canary, encoding, haystack) where the encoded canary occurs."""
    patterns = [(label, enc, pat) for label, c in canaries.items() for enc, pat in encodings(c).items()]
    return [Hit(label, enc, where) for where, data in haystacks.items()
            for label, enc, pat in patterns if pat in data]


def files_under(root: Path, exclude: Iterable[Path] = ()) -> dict[str, bytes]:
    """Every regular file below `root` (except the `exclude` subtrees), by path."""
    skip = [Path(p).resolve() for p in exclude]
    out = {}
    for path in sorted(Path(root).rglob("*")):
        real = path.resolve()
        if path.is_file() and not any(real == s or s in real.parents for s in skip):
            out[str(path)] = path.read_bytes()
    return out


# -------------------------------------------------------------------- capture
@dataclass
class Capture:
    """`tcpdump -i IFACE -w PCAP` on the given TCP ports (none given: every frame), inside
    network namespace `netns` if set, for the lifetime of a `with` block."""

    pcap: Path
    ports: list[int]
    iface: str = "lo"
    netns: str | None = None
    dropped: int | None = None  # packets the kernel dropped (read from tcpdump's summary)
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def __enter__(self) -> Capture:
        self.pcap.parent.mkdir(parents=True, exist_ok=True)
        log = self.pcap.with_suffix(".log")
        expr = ["tcp and (" + " or ".join(f"port {p}" for p in self.ports) + ")"] if self.ports else []
        where = ["ip", "netns", "exec", self.netns] if self.netns else []
        with log.open("wb") as fh:  # -U: write each packet at once; -s 0: whole packets
            self._proc = subprocess.Popen([*where, "tcpdump", "-i", self.iface, "-U", "-s", "0", "-n",
                                           "-w", str(self.pcap), *expr], stdout=fh, stderr=fh)
        deadline = time.monotonic() + 20
        while b"listening on" not in log.read_bytes():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {log.read_text(errors='replace')}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        time.sleep(0.5)  # the last packets of the run
        self._proc.send_signal(signal.SIGINT)  # tcpdump flushes and prints its counters
        try:
            self._proc.wait(20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        found = re.search(rb"(\d+) packets? dropped by kernel", self.pcap.with_suffix(".log").read_bytes())
        self.dropped = int(found.group(1)) if found else None


# ------------------------------------------------------------------ pcap, TCP
@dataclass(frozen=True)
class Segment:
    flow: tuple[str, int, str, int]  # src, sport, dst, dport
    seq: int
    syn: bool
    payload: bytes


def read_pcap(path: Path) -> Iterator[Segment]:
    """TCP segments of a classic pcap file (Ethernet, Linux cooked v1/v2; IPv4 and IPv6)."""
    for frame, linktype, link_len in _frames(path):
        if seg := _tcp(frame, linktype, link_len):
            yield seg


def _frames(path: Path) -> Iterator[tuple[bytes, int, int]]:
    """Every frame of a classic pcap file, with the link type and link-header length."""
    data = Path(path).read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        e = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        e = ">"
    else:
        raise ValueError(f"{path} is not a classic pcap file (pcapng is not supported)")
    linktype = struct.unpack(e + "I", data[20:24])[0]
    link_len = {1: 14, 113: 16, 276: 20}.get(linktype)
    if link_len is None:
        raise ValueError(f"{path}: unsupported link type {linktype}")
    pos = 24
    while pos + 16 <= len(data):
        incl, orig = struct.unpack(e + "II", data[pos + 8:pos + 16])
        if incl != orig:
            raise ValueError(f"{path}: a packet was truncated ({incl} of {orig} bytes); capture with -s 0")
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        yield frame, linktype, link_len


def _ethertype(frame: bytes, linktype: int, link_len: int) -> int:
    return struct.unpack(">H", frame[link_len - 2:link_len] if linktype != 276 else frame[0:2])[0]


def _tcp(frame: bytes, linktype: int, link_len: int) -> Segment | None:
    ethertype = _ethertype(frame, linktype, link_len)
    ip = frame[link_len:]
    if ethertype == 0x0800:
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        total = struct.unpack(">H", ip[2:4])[0]
        src, dst, tcp = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20])), ip[ihl:total]
    elif ethertype == 0x86DD:
        proto, plen = ip[6], struct.unpack(">H", ip[4:6])[0]
        src, dst, tcp = ip[8:24].hex(), ip[24:40].hex(), ip[40:40 + plen]
    else:
        return None
    if proto != 6:
        return None
    sport, dport, seq = struct.unpack(">HHI", tcp[:8])
    offset = (tcp[12] >> 4) * 4
    return Segment((src, sport, dst, dport), seq, bool(tcp[13] & 0x02), bytes(tcp[offset:]))


def tcp_streams(segments: Iterable[Segment]) -> dict[str, bytes]:
    """Each direction of each connection as one byte string, ordered by sequence number
    (retransmissions overwrite the same bytes; a new SYN on a reused port starts a new stream)."""
    streams: dict[str, dict[int, bytes]] = {}
    base: dict[tuple, int] = {}
    names: dict[tuple, str] = {}
    for seg in segments:
        if seg.syn or seg.flow not in base:
            base[seg.flow] = (seg.seq + 1) if seg.syn else seg.seq
            names[seg.flow] = f"{seg.flow[0]}:{seg.flow[1]}->{seg.flow[2]}:{seg.flow[3]}#{len(streams)}"
            streams[names[seg.flow]] = {}
        if seg.payload:
            streams[names[seg.flow]][(seg.seq - base[seg.flow]) % 2**32] = seg.payload
    out = {}
    for name, parts in streams.items():
        buf = bytearray()
        for off in sorted(parts):
            if off > len(buf):
                buf.extend(b"\0" * (off - len(buf)))  # a gap (lost packet): the test fails on drops
            buf[off:off + len(parts[off])] = parts[off]
        out[name] = bytes(buf)
    return out


# --------------------------------------------------------- who talked to whom
@dataclass(frozen=True)
class Packet:
    """One captured frame: protocol ("tcp", "udp", "icmp", "icmpv6", "arp", "ip-proto-N",
    "ethertype-0xNNNN"), addresses (ARP: sender and target IP), ports (ICMP: type in dport)."""

    proto: str
    src: str = ""
    dst: str = ""
    sport: int = 0
    dport: int = 0


def read_packets(path: Path) -> Iterator[Packet]:
    """Every frame of a capture, TCP or not, as a Packet."""
    for frame, linktype, link_len in _frames(path):
        yield _packet(_ethertype(frame, linktype, link_len), frame[link_len:])


def _packet(ethertype: int, ip: bytes) -> Packet:
    if ethertype == 0x0806:  # ARP (Ethernet/IPv4): sender IP at 14, target IP at 24
        return Packet("arp", str(ipaddress.ip_address(ip[14:18])), str(ipaddress.ip_address(ip[24:28])))
    if ethertype == 0x0800:
        proto, body = ip[9], ip[(ip[0] & 0x0F) * 4:]
        src, dst = str(ipaddress.ip_address(ip[12:16])), str(ipaddress.ip_address(ip[16:20]))
        names = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp"}
    elif ethertype == 0x86DD:
        proto, body = ip[6], ip[40:]
        while proto in (0, 43, 60):  # hop-by-hop (MLD's router alert), routing, destination options
            proto, body = body[0], body[(body[1] + 1) * 8:]
        src, dst = str(ipaddress.ip_address(ip[8:24])), str(ipaddress.ip_address(ip[24:40]))
        names = {58: "icmpv6", 6: "tcp", 17: "udp"}
    else:
        return Packet(f"ethertype-{ethertype:#06x}")
    name = names.get(proto, f"ip-proto-{proto}")
    if name in ("tcp", "udp"):
        sport, dport = struct.unpack(">HH", body[:4])
        return Packet(name, src, dst, sport, dport)
    return Packet(name, src, dst, 0, body[0] if body else 0)


# Link housekeeping the kernel does on any link that comes up: IPv6 multicast listener reports
# (MLD: 130-132, 143), router and neighbour discovery (133-136, including duplicate-address
# detection from ::), IPv4 IGMP reports to 224.0.0.x. Addresses and flags only, no application data.
_ICMPV6_LINK = {130, 131, 132, 133, 134, 135, 136, 143}
_V6_LINK_SRC = (ipaddress.ip_network("fe80::/10"), ipaddress.ip_network("::/128"))
_V6_LINK_DST = (ipaddress.ip_network("fe80::/10"), ipaddress.ip_network("ff02::/16"))
_V4_LINK_MULTICAST = ipaddress.ip_network("224.0.0.0/24")


def stray_packets(packets: Iterable[Packet], centre: str, server: str, port: int | Iterable[int]) -> list[Packet]:
    """The packets on a centre's link that are not (a) TCP between the centre and `server:port`
    (the SuperLink; several ports: also the ServerApp's data plane), (b) ARP between those two
    addresses, or (c) link housekeeping: IPv6
    link-local MLD/neighbour discovery, IGMP from either address to 224.0.0.x. That is: any
    traffic to or from anything else, and any other protocol."""
    def within(addr: str, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
        return any(ipaddress.ip_address(addr) in net for net in nets)

    ports = {port} if isinstance(port, int) else set(port)
    out = []
    for p in packets:
        if p.proto == "tcp":
            ok = ((p.src, p.dst) == (centre, server) and p.dport in ports) or \
                ((p.src, p.dst) == (server, centre) and p.sport in ports)
        elif p.proto == "arp":
            ok = {p.src, p.dst} == {centre, server}
        elif p.proto == "icmpv6":
            ok = p.dport in _ICMPV6_LINK and within(p.src, _V6_LINK_SRC) and within(p.dst, _V6_LINK_DST)
        elif p.proto == "igmp":
            ok = p.src in (centre, server) and within(p.dst, [_V4_LINK_MULTICAST])
        else:
            ok = False
        if not ok:
            out.append(p)
    return out


# ----------------------------------------------------------------------- HTTP
def http_messages(stream: bytes) -> tuple[list[bytes], set[str]]:
    """The decoded bodies of the HTTP/1.1 messages in one direction of a connection, and
    the content-encodings they declared. Stops quietly at anything that is not HTTP."""
    bodies: list[bytes] = []
    codings: set[str] = set()
    pos = 0
    while (end := stream.find(b"\r\n\r\n", pos)) != -1:
        head = stream[pos:end].decode("latin-1").split("\r\n")
        if not re.match(r"^(HTTP/1\.[01] \d{3}|[A-Z]+ \S+ HTTP/1\.[01])", head[0]):
            break
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        pos = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, pos = _dechunk(stream, pos)
        else:
            length = int(headers.get("content-length", "0") or 0)
            body, pos = stream[pos:pos + length], pos + length
        coding = headers.get("content-encoding", "identity").lower()
        codings.add(coding)
        bodies.append(_decode(body, coding))
    return bodies, codings


def _dechunk(stream: bytes, pos: int) -> tuple[bytes, int]:
    out = bytearray()
    while (eol := stream.find(b"\r\n", pos)) != -1:
        size = int(stream[pos:eol].split(b";")[0] or b"0", 16)
        pos = eol + 2
        if size == 0:
            return bytes(out), stream.find(b"\r\n", pos) + 2
        out += stream[pos:pos + size]
        pos += size + 2
    return bytes(out), len(stream)


def _decode(body: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompress(body, 47)  # 47: gzip or zlib header, detected
    if coding in ("identity", ""):
        return body
    raise ValueError(f"content-encoding {coding!r} in the capture: cannot search inside it")


def find_compressed(data: bytes, limit: int = 64 << 20) -> list[bytes]:
    """Inflate every gzip or zlib stream that starts somewhere in `data` (false starts are skipped)."""
    out = []
    for m in re.finditer(rb"\x1f\x8b\x08|\x78[\x01\x5e\x9c\xda]", data):
        d = zlib.decompressobj(47)
        try:
            inflated = d.decompress(data[m.start():], limit)
        except zlib.error:
            continue
        if d.eof and inflated:
            out.append(inflated)
    return out


def capture_haystacks(pcap: Path) -> tuple[dict[str, bytes], set[str]]:
    """Everything in a capture worth searching: raw streams, HTTP bodies, inflated streams."""
    hay, codings = stream_haystacks(tcp_streams(read_pcap(pcap)), "tcp")
    return {"pcap file": Path(pcap).read_bytes(), **hay}, codings


def stream_haystacks(streams: Mapping[str, bytes], kind: str) -> tuple[dict[str, bytes], set[str]]:
    """Each byte stream (`kind`: "tcp", or "tls" for decrypted ones), its HTTP bodies and any
    inflated stream in it, and the content-encodings its HTTP messages declared."""
    hay: dict[str, bytes] = {}
    codings: set[str] = set()
    for name, stream in streams.items():
        hay[f"{kind} {name}"] = stream
        bodies, seen = http_messages(stream)
        codings |= seen
        for i, body in enumerate(bodies):
            hay[f"http body {i} of {kind} {name}"] = body
        for i, inflated in enumerate(find_compressed(stream)):
            hay[f"inflated stream {i} of {kind} {name}"] = inflated
    return hay, codings
