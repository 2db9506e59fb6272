"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocab 256, no specials).

Every string in every language (and emoji) is representable, so federated
clients with different languages share one vocabulary without any training,
merging or downloads. Deliberately numpy-only so data-loading code can import it
without pulling in torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ByteTokenizer:
    """Maps text <-> UTF-8 byte ids in ``0..255``."""

    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ints (lone surrogates are not text: they raise)."""
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but as a writable ``uint8`` array (1 byte per token)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode`. Invalid UTF-8 (e.g. a sampled partial code
        point) becomes U+FFFD instead of raising, so any ids in ``0..255`` decode.

        Accepts lists, numpy arrays and CPU tensors; other ids raise ValueError.
        """
        # np.asarray, not bytes(ids): bytes(int64 array) copies the raw 8-byte buffer
        arr = np.asarray(ids)
        if arr.size == 0:
            return ""
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            msg = f"ids must be a 1-D sequence of ints, got {arr.dtype} {arr.shape}"
            raise ValueError(msg)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            msg = f"token ids must be in 0..{self.vocab_size - 1}, got {lo}..{hi}"
            raise ValueError(msg)
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
