"""Capture every frame on a link, and read it back: TCP streams, and who talked to whom.

`Capture` runs `tcpdump -s 0` (whole frames) on an interface, inside a network namespace if
given, for the lifetime of a `with` block; `read_pcap`/`tcp_streams` reassemble each direction
of each TCP connection; `read_packets`/`stray_packets` check that a centre's link carried only
its traffic with the coordinator. deploy/residency/search.py searches what these return.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


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




def link_counts(path: Path) -> dict[str, int]:
    """Frames and bytes (whole frames, link header included) in a capture file."""
    frames = size = 0
    for frame, _, _ in _frames(path):
        frames += 1
        size += len(frame)
    return {"frames": frames, "bytes": size}
