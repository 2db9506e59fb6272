"""models/memory.py: what bridgepool's processes ask of the allocator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys
import torch
from deploy.cli import main
try:
    main(["--help"])  # any bridgepool command: the choice is made before its arguments are parsed
except SystemExit:
    pass
x = torch.ones(64 << 20, dtype=torch.uint8)  # one 64 MiB buffer, written (faulted in)
huge = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print(huge << 10)
"""


def _huge_bytes(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_bridgepool_processes_put_large_tensors_on_huge_pages_unless_told_not_to():
    """The kernel's THP setting decides: `never`, none can be had; `always`, every process has them
    anyway; `madvise` (Debian's default, these machines'), only what torch asks for."""
    import os

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if "[never]" in thp:
        assert _huge_bytes(env) == 0
        return
    assert _huge_bytes(env) >= 32 << 20  # most of the buffer (its ends may fall outside 2 MiB pages)
    if "[madvise]" in thp:
        assert _huge_bytes({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == 0  # the user's own choice is kept
