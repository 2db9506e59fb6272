"""Each centre on a CPU share of its own, as on a machine of its own (Linux cgroups).

On one machine the centres' trainers and the coordinator (SuperLink, ServerApp) take
turns on the same cores, so the bench's main rows charge the coordinator's CPU to the
centres. In a deployment each centre trains on its own hardware and the coordinator
runs elsewhere. These groups emulate that: each centre's processes (worker, SuperNode,
ClientApp runtime; or its bare local loop) run in a cgroup capped at `cores` CPUs, and
the coordinator runs outside them, on what is left. The cap applies to the reference
loop and the federated run alike, so their ratio is what federating costs a centre.

Needs root (or a delegated cgroup) and the cpu controller, v1 (`cpu.cfs_quota_us`) or
v2 (`cpu.max`); `unavailable()` says why not, and the bench then leaves these rows out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # the CFS period the quota is a fraction of (the kernel's default)
PREFIX = "bridgepool-bench-"


@dataclass
class CpuShares:
    """One capped cgroup per centre; `remove()` once their processes have exited."""

    groups: dict[str, Path]
    cores: float

    def remove(self) -> None:
        for group in self.groups.values():
            try:
                group.rmdir()  # a cgroup directory goes with rmdir, its control files with it
            except OSError:
                pass  # a process still inside (it is stopped by now) or already gone


def _layout(root: Path) -> tuple[int, Path] | str:
    """(cgroup version, directory to create groups in), or why there is none."""
    controllers = root / "cgroup.controllers"
    if controllers.exists():  # v2, unified
        if "cpu" not in controllers.read_text().split():
            return f"the cpu controller is not enabled in {controllers}"
        return 2, root
    if (root / "cpu" / "cpu.cfs_quota_us").exists():  # v1, the cpu hierarchy
        return 1, root / "cpu"
    return f"no cgroup cpu controller under {root} (neither v2 cgroup.controllers nor v1 cpu/cpu.cfs_quota_us)"


def unavailable(root: Path = ROOT) -> str | None:
    """Why capped groups cannot be made here (None: they can)."""
    layout = _layout(root)
    if isinstance(layout, str):
        return layout
    if not os.access(layout[1], os.W_OK):
        return f"{layout[1]} is not writable (run the bench as root, or delegate a cgroup to this user)"
    return None


def create(names: list[str], cores: float, root: Path = ROOT) -> CpuShares:
    """A group per name, each capped at `cores` CPUs (0 < cores)."""
    if cores <= 0:
        raise ValueError(f"a centre's CPU share must be > 0 cores, got {cores}")
    layout = _layout(root)
    if isinstance(layout, str):
        raise RuntimeError(layout)
    version, parent = layout
    quota = round(cores * PERIOD_US)
    if version == 2:
        (parent / "cgroup.subtree_control").write_text("+cpu")  # children get the cpu controller
    for stale in parent.glob(f"{PREFIX}*"):  # left by a bench that was killed: its pid is gone
        if not Path("/proc", stale.name.removeprefix(PREFIX).split("-")[0]).exists():
            try:
                stale.rmdir()
            except OSError:
                pass
    groups: dict[str, Path] = {}
    for name in names:
        group = parent / f"{PREFIX}{os.getpid()}-{name}"
        group.mkdir(exist_ok=True)
        if version == 2:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        groups[name] = group
    return CpuShares(groups, cores)


def join(group: Path, pid: int | None = None) -> None:
    """Move a process (default: this one), all its threads, into `group`; its children inherit it."""
    (group / "cgroup.procs").write_text(str(pid or os.getpid()))


def in_group(group: Path, argv: list[str]) -> list[str]:
    """`argv`, started inside `group`: the shell moves itself in, then becomes the command (same pid)."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *argv]
