"""The data plane's unit of transfer: named arrays laid end to end in one byte blob (numpy only).

Model bytes travel outside Flower's messages (server/dataplane.py serves them, clients/dataplane.py
moves them); the Flower message carries only this module's manifest: for each array its name,
dtype, shape, offset, byte size and digest (BLAKE3 by default, or SHA-256: the manifest says). Both
sides derive the layout from the arrays alone, so the manifest is checked against what the model
allows (`check_against`) before a single byte of a blob is allocated, and each region is hashed
once, as it streams in (`RegionHasher`).

bf16 has no numpy dtype: a bf16 vector travels as its raw 16-bit patterns under the dtype name
"bfloat16" (`BF16`), and becomes a torch tensor only where torch is at hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

# The blob's hash, recorded in every manifest. BLAKE3 (the Rust crate's official bindings) runs at
# ~2-3x SHA-256's speed per core here (SHA-256: ~1.3 GB/s with the CPU's SHA extensions); on a 2-core
# machine moving 2 GB per round, the hash is otherwise what limits the wire.
HASHES: dict[str, Callable[[], Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
HASH = "blake3"
BF16 = "bfloat16"  # raw uint16 bit patterns on the numpy side
Shapes = Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype name): what may travel


class BlobError(ValueError):
    """A manifest or a blob does not match what was announced or allowed."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    digest: str  # hex, of the manifest's hash (HASHES)
    hash: str = field(default=HASH, compare=True)


def _dtype(name: str) -> np.dtype:
    return np.dtype(np.uint16) if name == BF16 else np.dtype(name)


@dataclass(frozen=True)
class Pieces:
    """One flat array of a blob held as several arrays of one dtype laid end to end (a model's tensors
    in the wire's order), so that it is hashed, sent and received in place, never copied into one."""

    parts: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if not self.parts or any(p.dtype != self.parts[0].dtype or not p.flags.c_contiguous for p in self.parts):
            raise BlobError("pieces must be contiguous arrays of one dtype")

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.size for p in self.parts),)

    def views(self) -> list[memoryview]:
        return [memoryview(p.reshape(-1)).cast("B") for p in self.parts]


Array = np.ndarray | Pieces


def views(a: Array) -> list[memoryview]:
    """The bytes of `a`, in order, without a copy."""
    return a.views() if isinstance(a, Pieces) else [memoryview(np.ascontiguousarray(a)).cast("B")]


def layout(arrays: Mapping[str, Array], dtypes: Mapping[str, str] | None = None,
           hash_name: str = HASH) -> list[Entry]:
    """The manifest of `arrays` laid out in sorted-name order, hashing each once (one read, no copy).
    `dtypes` renames a dtype on the wire (a uint16 array that holds bf16 values: BF16)."""
    entries, offset = [], 0
    for name in sorted(arrays):
        a = arrays[name]
        # A whole model in memory: BLAKE3's tree hashes it on every core (the same digest). The coordinator
        # hashes the round's model while the centres wait for its manifest, with the cores otherwise idle.
        h = blake3.blake3(max_threads=blake3.blake3.AUTO) if hash_name == "blake3" else HASHES[hash_name]()
        for v in views(a):
            h.update(v)
        dtype = (dtypes or {}).get(name, a.dtype.name)
        entries.append(Entry(name, dtype, tuple(int(d) for d in a.shape), offset, a.nbytes, h.hexdigest(),
                             hash_name))
        offset += a.nbytes
    return entries


def total_bytes(entries: list[Entry]) -> int:
    return sum(e.nbytes for e in entries)


def hash_of(entries: list[Entry]) -> str:
    """The hash all of a manifest's digests are of (one per manifest)."""
    return entries[0].hash if entries else HASH


def to_json(entries: list[Entry]) -> str:
    arrays = [{k: v for k, v in e.__dict__.items() if k != "hash"} | {"shape": list(e.shape)} for e in entries]
    return json.dumps({"hash": hash_of(entries), "arrays": arrays}, separators=(",", ":"))


def from_json(text: str, max_arrays: int = 16) -> list[Entry]:
    """Parse a manifest; BlobError for anything malformed (the text comes from the other side)."""
    try:
        doc = json.loads(text)
        hash_name = doc.get("hash")
        if hash_name not in HASHES:
            raise BlobError(f"manifest hash {hash_name!r} is not one of {', '.join(HASHES)}")
        raw = doc["arrays"]
        if not isinstance(raw, list) or len(raw) > max_arrays:
            raise BlobError(f"manifest must list at most {max_arrays} arrays")
        entries = [Entry(str(a["name"]), str(a["dtype"]), tuple(int(d) for d in a["shape"]), int(a["offset"]),
                         int(a["nbytes"]), str(a["digest"]), hash_name) for a in raw]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, BlobError):
            raise
        raise BlobError(f"malformed manifest: {err}") from err
    offset = 0
    for e in entries:
        if e.offset != offset or e.nbytes < 0 or len(e.digest) != 64:
            raise BlobError(f"manifest entry {e.name!r}: arrays must lie end to end with a 256-bit digest each")
        if any(d < 0 for d in e.shape) or _dtype(e.dtype).itemsize * int(np.prod(e.shape)) != e.nbytes:
            raise BlobError(f"manifest entry {e.name!r}: {e.nbytes} bytes do not fit {e.dtype} {e.shape}")
        offset += e.nbytes
    return entries


def check_against(entries: list[Entry], allowed: Shapes) -> None:
    """Every array is one the model allows, with its shape and dtype (before allocating anything)."""
    for e in entries:
        if e.name not in allowed:
            raise BlobError(f"array {e.name!r} is not one the model's manifest allows ({sorted(allowed)})")
        shape, dtype = allowed[e.name]
        if tuple(shape) != e.shape or dtype != e.dtype:
            raise BlobError(f"array {e.name!r} is {e.dtype} {e.shape}, the model allows {dtype} {tuple(shape)}")


def split(buffer: np.ndarray, entries: list[Entry]) -> dict[str, np.ndarray]:
    """Views (no copy) of `buffer` (uint8, the whole blob) as the manifest's arrays."""
    out = {}
    for e in entries:
        region = buffer[e.offset:e.offset + e.nbytes]
        out[e.name] = region.view(_dtype(e.dtype)).reshape(e.shape)
    return out


class RegionHasher:
    """The digest of each manifest region, fed the blob's bytes in order, in pieces of any size."""

    def __init__(self, entries: list[Entry]):
        self.entries, self._i, self._pos = entries, 0, 0
        self._new = HASHES[hash_of(entries)]
        self._h = self._new()
        self.bad: list[str] = []  # names whose hash did not match

    def update(self, piece: memoryview) -> None:
        while len(piece) and self._i < len(self.entries):
            e = self.entries[self._i]
            take = min(len(piece), e.offset + e.nbytes - self._pos)
            self._h.update(piece[:take])
            self._pos += take
            piece = piece[take:]
            if self._pos == e.offset + e.nbytes:
                self._close(e)
        while self._i < len(self.entries) and self.entries[self._i].nbytes == 0:
            self._close(self.entries[self._i])

    def _close(self, e: Entry) -> None:
        if self._h.hexdigest() != e.digest:
            self.bad.append(e.name)
        self._h, self._i = self._new(), self._i + 1

    def verify(self) -> None:
        """BlobError unless every region arrived whole and matched its hash."""
        self.update(memoryview(b""))
        if self._i < len(self.entries):
            raise BlobError(f"blob ended inside array {self.entries[self._i].name!r} ({self._pos} bytes received)")
        if self.bad:
            raise BlobError(f"{hash_of(self.entries)} mismatch for {', '.join(map(repr, self.bad))}: "
                            "corrupted or altered in transit")
