"""Centres' updates on the coordinator's disk, not in its memory, until the round aggregates them.

Holding every centre's update in memory makes the coordinator grow with the number of centres: n x
the model's bytes on top of its master weights (which are also the broadcast copy), outer momentum and the sum. So
the data plane (server/dataplane.py) writes each upload, as it streams in and is hashed, to a file
of the run's spool directory (owner-only), and the round reads the files back a chunk at a time
(server/chunked.py): the coordinator then holds its three model-sized vectors plus one chunk per
centre. An update lives one round: once aggregated or refused its file goes back to the data
plane's spares (`recycle`), to be written over by a later upload, and the whole spool is deleted
when the data plane stops, so an update that did not arrive whole (a centre or the coordinator
killed mid-upload) is never read. Why spares: writing a new file's pages ran at ~0.5 GB/s on the
2-core machine (each page allocated, often by evicting another), writing over a file whose pages
are still cached at ~4 GB/s; a 514 MB upload then costs ~0.15 s of the coordinator's writes, not
~1 s. The price is disk space (the spool keeps as many files as updates were ever in flight at
once) and the kernel writing those pages back to the disk now and then.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models import blob
from models.packing import BF16_KEY, INT8_BLOCK, INT8_KEY, PARAMS_KEY, SCALE_KEY, from_bf16_bits


def open_spool(directory: Path) -> Path:
    """The spool directory, emptied (what a stopped run left is never read) and owner-only."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    return directory


def clear_spool(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class SpooledUpdate:
    """One centre's verified upload, on disk: `entries` is its manifest (checked against the model's
    upload shapes before a byte was written, each region's hash checked as it arrived)."""

    entries: list[blob.Entry]
    path: Path
    recycle: Callable[[Path], None] | None = field(default=None, repr=False)  # takes the file back; None: unlink
    _fd: int | None = field(default=None, repr=False)
    _bits: np.ndarray | None = field(default=None, repr=False)  # bf16: the chunk's bit patterns (`weights`)

    @property
    def names(self) -> set[str]:
        return {e.name for e in self.entries}

    @property
    def nbytes(self) -> int:
        return blob.total_bytes(self.entries)

    def _read(self, name: str, start: int, stop: int, into: np.ndarray | None = None) -> np.ndarray:
        """Values [start, stop) of the array `name`, read from the file into `into` (a buffer of
        that many values of the array's dtype) or a fresh buffer."""
        e = next(x for x in self.entries if x.name == name)
        dtype = np.dtype(np.uint16) if e.dtype == blob.BF16 else np.dtype(e.dtype)
        out = np.empty(stop - start, dtype) if into is None else into
        view, offset = memoryview(out).cast("B"), e.offset + start * dtype.itemsize
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        while len(view):
            n = os.preadv(self._fd, [view], offset)
            if n <= 0:
                raise blob.BlobError(f"spooled update {self.path.name} ended early")
            view, offset = view[n:], offset + n
        return out

    def weights(self, reference: np.ndarray, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """The centre's new weights for values [start, stop), fp32, decoded as server/validation.py's
        `decode_update` decodes the whole update (element-wise, so bit for bit the same): fp32 as
        sent, bf16 widened, an int8 pseudo-gradient subtracted from `reference` (b, what was sent).
        `start` is a multiple of INT8_BLOCK for int8 (chunks are). `out`: an fp32 buffer of at least
        stop - start values that fp32 and bf16 are decoded into (then the result is a view of it):
        the coordinator's processes map each fresh chunk-sized buffer anew (models/memory.py), and
        reading a round's updates into fresh ones took twice as long."""
        names = self.names
        into = None if out is None else out[:stop - start]
        if names == {PARAMS_KEY}:
            return self._read(PARAMS_KEY, start, stop, into)
        if names == {BF16_KEY}:
            # The bit patterns land in a scratch of this update's, kept while it lives: a fresh one per
            # chunk is mapped and faulted in anew each time, like a fresh fp32 buffer (see `out`).
            if into is not None and (self._bits is None or self._bits.size < into.size):
                self._bits = np.empty(into.size, np.uint16)
            bits = None if into is None else self._bits[:into.size]  # type: ignore[index]
            return from_bf16_bits(self._read(BF16_KEY, start, stop, bits), out=into)
        if names == {INT8_KEY, SCALE_KEY}:
            if start % INT8_BLOCK:
                raise ValueError(f"int8 chunks start on a block boundary ({INT8_BLOCK}), not {start}")
            q = self._read(INT8_KEY, start, stop)
            first, last = start // INT8_BLOCK, -(-stop // INT8_BLOCK)
            scale = self._read(SCALE_KEY, first, last)
            pad = np.zeros((-q.size) % INT8_BLOCK, np.int8)
            delta = (np.concatenate([q, pad]).reshape(-1, INT8_BLOCK).astype(np.float32)
                     * scale[:, None]).reshape(-1)[:q.size]
            return reference[start:stop] - delta
        raise blob.BlobError(f"spooled update holds {sorted(names)}, not one update form")

    def discard(self) -> None:
        """Close the file and hand it back to be written over, or delete it (aggregated or refused: it
        is never read again as this update)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._bits = None
        recycle, self.recycle = self.recycle, None
        if recycle is not None:
            recycle(self.path)
        else:
            self.path.unlink(missing_ok=True)
