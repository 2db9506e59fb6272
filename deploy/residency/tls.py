"""Decrypt the TLS connections of a capture with Wireshark's `tshark` and a key-log file.

For `bridgepool verify residency` in the network-namespace topology (TLS on): every Python
process of the verification federation writes its session secrets in the NSS key-log format
(`keylog_hook` puts a `sitecustomize` on PYTHONPATH that sets `SSLContext.keylog_filename`;
the bytes sent are unchanged), and `tls_plaintexts` has tshark (Debian's `tshark`, see
deploy/install-system-packages.sh) decrypt every TCP connection of a pcap with them
(`-o tls.keylog_file:`) and hand back, per direction, the application data each side wrote
(`-z follow,tls,yaml,N`), so deploy/residency/search.py can search what actually crossed the wire.
The hook is for a throwaway verification federation only: a key log decrypts its sessions.

Strict, so that a connection is never silently left unsearched: every TCP connection that
carries payload is decoded as TLS (on the port its SYN went to), and each direction's
payload must consist of whole TLS records, every one of them in clear (hello, change cipher
spec) or decrypted. A connection without logged secrets, a record that fails
authentication, a stream cut off or with a gap, or payload that is not TLS raises TlsError.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import yaml

# Per frame: which connection and direction, where its payload sits, and its TLS records.
# A record shows a content type when it is in clear or was decrypted; an encrypted record
# tshark could not decrypt shows only its outer (opaque) type.
_FIELDS = ("frame.number", "tcp.stream", "ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst",
           "tcp.dstport", "tcp.seq", "tcp.len", "tls.record.length", "tls.record.opaque_type",
           "tls.record.content_type", "tls.handshake.type", "tls.handshake.extensions.supported_version")

# Whole TLS records and application data reassembled across segments, out-of-order ones too,
# whatever a user's Wireshark preferences say (these are the defaults but the last one).
_PREFS = [a for p in ("tcp.desegment_tcp_streams:TRUE", "tcp.relative_sequence_numbers:TRUE",
                      "tls.desegment_ssl_records:TRUE", "tls.desegment_ssl_application_data:TRUE",
                      "tcp.reassemble_out_of_order:TRUE") for a in ("-o", p)]


class TlsError(ValueError):
    pass


KEYLOG_ENV = "BRIDGEPOOL_VERIFY_KEYLOG"
# Every ssl.SSLContext made in a process that imports this (as sitecustomize) logs its session secrets.
KEYLOG_HOOK = f'''\
import os
import ssl

_path = os.environ.get("{KEYLOG_ENV}")
if _path:
    _new = ssl.SSLContext.__new__

    def _logging_new(cls, *args, **kwargs):
        ctx = _new(cls, *args, **kwargs)
        ctx.keylog_filename = _path
        return ctx

    ssl.SSLContext.__new__ = _logging_new
'''


def keylog_hook(folder: Path, keylog: Path) -> dict[str, str]:
    """Write the hook into `folder`; returns the environment that makes a Python process
    (and the processes it starts with that environment) log its TLS secrets to `keylog`."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(KEYLOG_HOOK)
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {KEYLOG_ENV: str(keylog), "PYTHONPATH": path}


def tls_plaintexts(pcap: Path, keylog: Path) -> dict[str, bytes]:
    """The decrypted application data of every TCP connection in `pcap`, per direction that
    carried payload, named `SRC:SPORT->DST:DPORT#STREAM` (STREAM: tshark's tcp.stream index;
    empty bytes for a direction that sent only handshake). TlsError unless every one decrypts."""
    if shutil.which("tshark") is None:
        raise TlsError("tshark is not installed (Debian package tshark: deploy/install-system-packages.sh)")
    syns = _tshark(pcap, ["-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0", "-T", "fields", "-e", "tcp.dstport"])
    decode_as = [a for port in sorted({int(p) for p in syns.split()}) for a in ("-d", f"tcp.port=={port},tls")]
    keys = [*decode_as, "-o", f"tls.keylog_file:{Path(keylog).resolve()}", *_PREFS]

    rows = _tshark(pcap, [*keys, "-Y", "tcp && !icmp && !icmpv6", "-T", "fields", "-E", "occurrence=a",
                          "-E", "aggregator=,", *(a for f in _FIELDS for a in ("-e", f))])
    frame_dir: dict[int, tuple[int, str]] = {}  # frame -> (stream, direction name)
    span: dict[tuple[int, str], list[int]] = {}  # (stream, direction) -> [first, end] sequence number of payload
    counts: dict[tuple[int, str], Counter] = defaultdict(Counter)  # (stream, direction) -> bytes/records
    tls13: set[int] = set()  # streams whose ServerHello chose TLS 1.3
    for line in rows.splitlines():
        frame, stream, src4, src6, sport, dst4, dst6, dport, seq, length, *tls = line.split("\t")
        rec_len, opaque, types, hs_types, versions = (v.split(",") if v else [] for v in tls)
        key = int(stream), f"{src4 or src6}:{sport}->{dst4 or dst6}:{dport}#{stream}"
        frame_dir[int(frame)] = key
        if int(length or 0):
            lo, hi = int(seq), int(seq) + int(length)
            first, end = span.get(key, [lo, hi])
            span[key] = [min(first, lo), max(end, hi)]
        counts[key].update(in_records=sum(5 + int(n) for n in rec_len), records=len(rec_len),
                           encrypted=len(opaque), typed=len(types))
        if "2" in hs_types and "0x0304" in versions:
            tls13.add(int(stream))

    for key, (first, end) in span.items():
        n = counts[key]
        if n["in_records"] != end - first:
            raise TlsError(f"{key[1]}: {end - first} bytes of TCP payload, {n['in_records']} of them in whole TLS "
                           "records (not TLS, or a stream cut off or with a gap in the capture)")
        if key[0] not in tls13:
            raise TlsError(f"{key[1]}: no TLS 1.3 ServerHello in the connection (not TLS 1.3, or no handshake)")
        # In TLS 1.3 a record in clear (hello, change cipher spec) has a content type and no opaque type;
        # an encrypted one has an opaque type, and a content type only once decrypted.
        decrypted = n["typed"] - (n["records"] - n["encrypted"])
        if decrypted != n["encrypted"]:
            why = "no session secrets for it in the key log" if decrypted == 0 else "a record does not authenticate"
            raise TlsError(f"{key[1]}: {n['encrypted'] - decrypted} of {n['encrypted']} encrypted TLS records "
                           f"do not decrypt ({why})")

    out = {name: b"" for _, name in span}
    streams = sorted({stream for stream, _ in span})
    follow = _tshark(pcap, [*keys, "-q", *(a for s in streams for a in ("-z", f"follow,tls,yaml,{s}"))])
    for doc in _yaml_documents(follow):
        for chunk in doc.get("packets") or []:
            _, name = frame_dir[chunk["packet"]]
            if name not in out:
                raise TlsError(f"tshark follow: data in frame {chunk['packet']} of {name}, a direction without payload")
            out[name] += chunk["data"]
    return out


def _tshark(pcap: Path, args: list[str]) -> str:
    done = subprocess.run(["tshark", "-n", "-r", str(pcap), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise TlsError(f"tshark failed on {pcap} ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _yaml_documents(text: str) -> list[dict]:
    """tshark prints one YAML mapping (peers:, packets:) per `-z follow`, back to back."""
    docs, current = [], []
    for line in text.splitlines():
        if line == "peers:" and current:
            docs.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        docs.append("\n".join(current))
    return [yaml.safe_load(d) for d in docs if d.strip()]
