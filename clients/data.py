"""Per-centre corpora: prepare once into local Arrow files, then sample token windows.

Sovereign pooling: every centre prepares and reads only its own corpus; what leaves the
centre is at most the manifest (counts and SHA-256 fingerprints, never text). Tokens are
UTF-8 bytes (see ``models.tokenizer.ByteTokenizer``), so no tokenizer state is involved.
``datasets`` is imported lazily: it costs ~1.5 s and the sampler itself does not need it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.sources import DataSourceError, quiet_datasets, read_documents, roff_to_text

__all__ = [
    "DEFAULT_CENTRES", "DataError", "DataSourceError", "TokenSampler", "load_split",
    "prepare_centre", "read_documents", "roff_to_text",
]

# One language per centre: each centre's corpus is its own (and genuinely non-IID).
DEFAULT_CENTRES: tuple[tuple[str, str], ...] = (
    ("fr-genci", "manpages:fr"),
    ("de-lrz", "manpages:de"),
    ("es-bsc", "manpages:es"),
    ("en-bristol", "manpages:en"),
)
SPLITS = ("train", "validation")
DOC_SEPARATOR = b"\n\n"  # between documents in the token stream (and in the fingerprint)
MANIFEST_FORMAT = "bridgepool-text/1"


class DataError(ValueError):
    """A centre's prepared data cannot be used; the message says which centre and the fix."""


# --------------------------------------------------------------------------- preparation
def _stream(texts: Sequence[str]) -> bytes:
    return DOC_SEPARATOR.join(t.encode("utf-8") for t in texts)


def _split_stats(texts: Sequence[str]) -> dict[str, Any]:
    stream = _stream(texts)
    # The hash covers exactly the token stream load_split returns, so a centre can prove
    # "same data as last run" (or reviewers can compare centres) without sharing text.
    return {"documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "tokens": len(stream), "sha256": hashlib.sha256(stream).hexdigest()}


def prepare_centre(source: str, out_dir: Path, *, validation_fraction: float = 0.05,
                   max_bytes: int | None = None, seed: int = 0,
                   overwrite: bool = False, undecodable: str = "stop") -> dict[str, Any]:
    """Read ``source``, shuffle documents by ``seed``, write train/validation Arrow splits.

    Writes ``out_dir/{train,validation}`` (``datasets`` ``save_to_disk``) and
    ``out_dir/manifest.json``; returns the manifest. The whole directory is built under
    ``<out_dir>.tmp`` and renamed into place, so a crash never leaves half-written data.
    ``undecodable``: see ``read_documents``; the manifest counts the files skipped.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another "
                              "--out or pass overwrite=True (--overwrite) to replace it")
    skipped: list[Path] = []
    docs = list(read_documents(source, max_bytes=max_bytes, undecodable=undecodable, skipped=skipped))
    if len(docs) < 2:
        raise DataSourceError(f"source '{source}' gave {len(docs)} document(s); need at least 2 "
                              "(one for training, one for validation)")
    if skipped:  # names stay here, in the centre's own log; the manifest holds only the count
        logging.getLogger("bridgepool.data").warning("%s: skipped %d file(s) that are not UTF-8: %s", source,
                                                     len(skipped), ", ".join(str(p) for p in skipped[:20]))
    # Shuffle whole documents (not bytes) so validation is held-out pages, not page halves.
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(len(docs) * validation_fraction)))
    parts = {"validation": [docs[i] for i in order[:n_val]],
             "train": [docs[i] for i in order[n_val:]]}

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of an interrupted run; it was never the live copy
    tmp.mkdir(parents=True)
    tmp.chmod(0o700)  # the corpus is the centre's: no other local user reads it, whatever the umask
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "source": source, "seed": seed,
        "validation_fraction": validation_fraction, "max_bytes": max_bytes,
        "tokenizer": "utf-8 bytes (vocab 256)",
        "fingerprint": "sha256 of the split's documents as UTF-8 joined by b'\\n\\n'",
        "splits": {},
        # Files left out as not UTF-8 (undecodable = "skip"): how many, never their names or content.
        "skipped-undecodable-files": len(skipped),
    }
    for split in SPLITS:
        with quiet_datasets() as datasets:
            datasets.Dataset.from_dict({"text": parts[split]}).save_to_disk(str(tmp / split))
        manifest["splits"][split] = _split_stats(parts[split])
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    # Swap in: move the old copy aside first so the final name is never half-written.
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
    return manifest


# --------------------------------------------------------------------------- loading
def load_split(data_dir: Path, split: str, centre: str, *, min_tokens: int = 2) -> np.ndarray:
    """The split's documents as one 1-D ``uint8`` token stream (UTF-8, joined by b"\\n\\n").

    Raises DataError naming the centre, the path and the fix when the data is missing,
    unreadable or shorter than ``min_tokens`` (callers pass ``seq_len + 2``).
    """
    data_dir = Path(data_dir)
    fix = f"run: bridgepool data prepare --out {data_dir}"
    if not data_dir.is_dir():
        raise DataError(f"centre {centre}: data directory {data_dir} does not exist; {fix}")
    path = data_dir / split
    if not path.is_dir():
        raise DataError(f"centre {centre}: split '{split}' missing at {path}; {fix}")
    try:
        with quiet_datasets() as datasets:
            ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow, not read into RAM
    except Exception as exc:  # datasets raises several types for a corrupt/foreign directory
        raise DataError(f"centre {centre}: cannot read {path} ({exc}); "
                        f"re-create it with: bridgepool data prepare --overwrite --out "
                        f"{data_dir}") from exc
    if not isinstance(ds, datasets.Dataset) or "text" not in ds.column_names:
        raise DataError(f"centre {centre}: {path} is not a prepared text split; {fix}")
    texts: list[str] = []
    for chunk in ds.data.column("text").chunks:  # Arrow chunks: no per-row Python dicts
        texts.extend(t for t in chunk.to_pylist() if t is not None)
    tokens = np.frombuffer(_stream(texts), dtype=np.uint8)
    if len(tokens) < min_tokens:
        raise DataError(f"centre {centre}: split '{split}' at {path} has {len(tokens)} tokens, "
                        f"need at least {min_tokens}; prepare more data (a larger source or "
                        f"max_bytes) or use a shorter seq_len; {fix} --overwrite")
    return tokens


# --------------------------------------------------------------------------- sampling
class TokenSampler:
    """Random training windows and fixed evaluation windows over one token stream.

    Batches are a pure function of ``(seed, step, rank)``: no iterator state, so a client that
    restarts mid-run (or is re-created by Flower every round) reproduces its batches.

    A centre of ``ranks`` data-parallel ranks (clients/ranks.py) draws one global batch of
    ``ranks x batch_size`` windows per step and rank r takes the r-th slice: the ranks
    together see exactly the batch one rank of batch ``ranks x batch_size`` would see, and
    ``ranks = 1`` gives the single-process batches unchanged.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, ranks: int = 1) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < ranks:
            raise ValueError(f"rank must be in [0, ranks), got rank {rank} of {ranks}")
        self.rank, self.ranks = rank, ranks
        self.tokens = np.asarray(tokens).reshape(-1)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        if len(self.tokens) < seq_len + 2:
            raise DataError(f"token stream has {len(self.tokens)} tokens, need at least "
                            f"seq_len + 2 = {seq_len + 2}; prepare more data or lower seq_len")
        self._arange = np.arange(seq_len + 1)

    def _windows(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.tokens[starts[:, None] + self._arange].astype(np.int64)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` int64 ``(batch_size, seq_len)``; ``y`` is ``x`` shifted by one token.
        This rank's slice of the step's global batch (see the class docstring)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, step])
        # A window needs seq_len + 1 tokens, so the last valid start is len - seq_len - 1.
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size * self.ranks)
        return self._windows(starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def eval_batches(self, n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Up to ``n_batches`` full batches of fixed, non-overlapping windows spread evenly
        over the stream (identical on every call). A stream too short for one full batch
        gives a single smaller batch, so evaluation always sees something.
        """
        if n_batches < 0:
            raise ValueError(f"n_batches must be >= 0, got {n_batches}")
        width = self.seq_len + 1
        available = len(self.tokens) // width  # >= 1 because len >= seq_len + 2
        total = min(n_batches * self.batch_size, available)
        if total == 0:
            return []
        if total >= self.batch_size:
            total -= total % self.batch_size  # only full batches: equal weight per batch
        # Evenly spaced starts from 0 to len - width; spacing >= width since total <= available.
        starts = np.arange(total) * (len(self.tokens) - width) // max(total - 1, 1)
        return [self._windows(starts[i:i + self.batch_size])
                for i in range(0, total, self.batch_size)]
