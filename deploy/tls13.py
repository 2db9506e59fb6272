"""Decrypt captured TLS 1.3 connections with the session secrets their endpoints logged.

A test-only aid for the canary search in the network-namespace topology (TLS on): the
processes write their secrets in the NSS key-log format (`SSLKEYLOGFILE`, OpenSSL's
keylog callback: `LABEL CLIENT_RANDOM SECRET` per line), and `tls_plaintexts` turns
each direction of each captured connection back into the bytes the application wrote,
so deploy/canary.py can search what actually crossed the wire, not ciphertext.

Only TLS 1.3 (what Python/OpenSSL 3 negotiate by default); every cipher suite of RFC 8446
but the CCM ones. Anything it cannot decrypt (no secrets for a connection, TLS 1.2, a
record that fails authentication, a cut-off stream) raises, so that a connection is never
silently left unsearched.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

# cipher suite -> (AEAD, key length, hash)
SUITES = {0x1301: (AESGCM, 16, hashes.SHA256), 0x1302: (AESGCM, 32, hashes.SHA384),
          0x1303: (ChaCha20Poly1305, 32, hashes.SHA256)}
HANDSHAKE, APPLICATION_DATA = 22, 23
_STREAM = re.compile(r"^(.*):(\d+)->(.*):(\d+)#(\d+)$")  # deploy/canary.py's tcp_streams names


class TlsError(ValueError):
    pass


def read_keylog(path: Path) -> dict[bytes, dict[str, bytes]]:
    """client random -> {label: secret} from an NSS key-log file."""
    out: dict[bytes, dict[str, bytes]] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#"):
            out.setdefault(bytes.fromhex(parts[1]), {})[parts[0]] = bytes.fromhex(parts[2])
    return out


def tls_plaintexts(streams: Mapping[str, bytes], keylog: Mapping[bytes, Mapping[str, bytes]]) -> dict[str, bytes]:
    """The application data of every TLS connection among `streams` (deploy/canary.py's
    `tcp_streams`: one entry per direction), per direction, under the stream's own name.
    Every stream with payload must belong to a TLS connection that decrypts: else TlsError."""
    out: dict[str, bytes] = {}
    parsed = {name: _STREAM.match(name) for name in streams}
    for name, data in streams.items():
        if not data or not _is_client_hello(data):
            continue
        m = parsed[name]
        assert m is not None, name
        src, sport, dst, dport, idx = m.groups()
        replies = [n for n, r in parsed.items() if r and r.groups()[:4] == (dst, dport, src, sport)
                   and int(r.group(5)) > int(idx)]  # the server's side: the next stream the other way
        reply = min(replies, key=lambda n: int(parsed[n].group(5)), default=None)  # type: ignore[union-attr]
        if reply is None or not streams[reply]:
            raise TlsError(f"{name}: no reply stream from the server in the capture")
        client_random = data[11:43]  # record header 5, handshake header 4, legacy version 2
        secrets = keylog.get(client_random)
        if not secrets or "CLIENT_TRAFFIC_SECRET_0" not in secrets:
            raise TlsError(f"{name}: no TLS 1.3 secrets logged for client random {client_random.hex()}"
                           " (a TLS 1.2 connection, or a process that did not log its keys)")
        suite = _server_hello_suite(streams[reply], name)
        out[name] = _decrypt(data, suite, [secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"],
                                           secrets["CLIENT_TRAFFIC_SECRET_0"]], name)
        out[reply] = _decrypt(streams[reply], suite, [secrets["SERVER_HANDSHAKE_TRAFFIC_SECRET"],
                                                      secrets["SERVER_TRAFFIC_SECRET_0"]], reply)
    left = [n for n, d in streams.items() if d and n not in out]
    if left:
        raise TlsError(f"streams with payload that are not TLS connections this could decrypt: {left}")
    return out


def _is_client_hello(data: bytes) -> bool:
    return len(data) >= 43 and data[0] == HANDSHAKE and data[1] == 3 and data[5] == 1


def _server_hello_suite(data: bytes, name: str) -> int:
    if len(data) < 44 or data[0] != HANDSHAKE or data[5] != 2:
        raise TlsError(f"{name}: the server's first record is not a ServerHello")
    sid_len = data[43]  # record 5 + handshake 4 + version 2 + random 32
    suite = struct.unpack(">H", data[44 + sid_len:46 + sid_len])[0]
    if suite not in SUITES:
        raise TlsError(f"{name}: cipher suite {suite:#06x} is not a TLS 1.3 suite this can decrypt")
    return suite


def _expand_label(secret: bytes, label: str, length: int, hash_cls: type) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack(">HB", length, len(full)) + full + b"\0"  # empty context
    return HKDFExpand(hash_cls(), length, info).derive(secret)


def _decrypt(data: bytes, suite: int, epochs: list[bytes], name: str) -> bytes:
    """Walk one direction's records: plaintext ones skipped, encrypted ones opened with the
    handshake keys, then (when they stop authenticating) the application keys; KeyUpdate honoured."""
    aead_cls, key_len, hash_cls = SUITES[suite]

    def keys(secret: bytes) -> tuple[object, bytes]:
        return aead_cls(_expand_label(secret, "key", key_len, hash_cls)), _expand_label(secret, "iv", 12, hash_cls)

    epoch, seq = 0, 0
    aead, iv = keys(epochs[0])
    out = bytearray()
    pos = 0
    while pos < len(data):
        if pos + 5 > len(data) or pos + 5 + struct.unpack(">H", data[pos + 3:pos + 5])[0] > len(data):
            raise TlsError(f"{name}: the stream ends inside a TLS record at byte {pos} of {len(data)}")
        kind, length = data[pos], struct.unpack(">H", data[pos + 3:pos + 5])[0]
        header, body = data[pos:pos + 5], data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if kind != APPLICATION_DATA:  # ClientHello/ServerHello, ChangeCipherSpec: not encrypted
            continue
        while True:
            nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))
            try:
                inner = aead.decrypt(nonce, body, header)  # type: ignore[attr-defined]
                break
            except InvalidTag:
                if epoch != 0:
                    raise TlsError(f"{name}: record at byte {pos - 5 - length} does not authenticate") from None
                epoch, seq = 1, 0  # the handshake is over: application traffic keys from here on
                aead, iv = keys(epochs[1])
        seq += 1
        inner = inner.rstrip(b"\0")
        content, inner_type = inner[:-1], inner[-1]
        if inner_type == APPLICATION_DATA:
            out += content
        elif inner_type == HANDSHAKE and epoch >= 1 and content[:1] == b"\x18":  # KeyUpdate
            epochs.append(_expand_label(epochs[-1], "traffic upd", hash_cls.digest_size, hash_cls))
            epoch, seq = epoch + 1, 0
            aead, iv = keys(epochs[-1])
    return bytes(out)
