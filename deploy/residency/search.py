"""Search for planted canaries in captured traffic and on the coordinator's disk.

Each centre's corpus gets unique canary strings (deploy/residency/verify.py plants them);
afterwards the capture (TCP streams reassembled by deploy/residency/capture.py, HTTP bodies
de-chunked and decoded, compressed streams inflated; TLS decrypted first by
deploy/residency/tls.py) and the coordinator's files are searched for each canary in every
encoding the system could carry it in: UTF-8 (= byte-level token ids as uint8), UTF-16
(little- and big-endian), token ids as int16/int32/int64 and float16/float32/float64 (little-
and big-endian), and base64 of the UTF-8.

Flower 1.41 sends protobuf over HTTP/1.1 without compression (its client sets no
content-encoding and its server has no compression middleware); `find_compressed`
still inflates any gzip/zlib stream found, and `http_messages` reports every
content-encoding seen, so a later Flower that compresses is caught, not missed.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.residency.capture import read_pcap, tcp_streams


@dataclass(frozen=True)
class Hit:
    canary: str  # the canary's label (the planting centre's name, or "probe")
    encoding: str
    where: str


# ------------------------------------------------------------------ encodings
def encodings(canary: str) -> dict[str, bytes]:
    """`canary` as the bytes each carrier would hold (byte-level tokens: id = UTF-8 byte)."""
    raw = canary.encode("utf-8")
    ids = np.frombuffer(raw, dtype=np.uint8)
    out = {"utf-8 / uint8 token ids": raw, "utf-16-le": canary.encode("utf-16-le"),
           "utf-16-be": canary.encode("utf-16-be")}
    # Byte ids 0..255 are exact in every float width; uint widths hold the same bytes as int ones.
    for dtype in ("int16", "int32", "int64", "float16", "float32", "float64"):
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
