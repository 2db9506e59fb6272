"""Give freed model-sized buffers back to the OS (glibc), so resident memory tracks what is live.

glibc serves allocations below its mmap threshold from its heap, and raises that threshold (up
to 32 MiB) each time it frees an mmapped block. A transformer's tensors are 1-20 MiB each, so the
gradients, optimiser temporaries and transfer buffers of one round stay resident after they are
freed, and a 353M-parameter centre worker sat at ~21 bytes/param instead of the ~16 it holds live.
A fixed threshold of 1 MiB (which also turns the raising off) maps every such buffer on its own,
returned to the OS when freed. No-op where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # <malloc.h>
THRESHOLD_BYTES = 1 << 20


def release_freed_memory() -> bool:
    """Set the fixed mmap threshold; True if glibc took it."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
