"""Where a run's CPU went: the CPU seconds of this process's descendants, by role, over a time window.

On one machine the centres' training and the federation's own processes (ServerApp, SuperLink,
SuperNodes...) share the cores, so a federated run's rate against its bare loop is bounded by what
those processes take. A thread samples each descendant's cumulative user + system time from
/proc/PID/stat (Linux) twice a second; `used(t0, t1)` is each role's share of the window between the
samples nearest t0 and t1. A process that starts inside the window counts from zero; one that ends
inside it loses at most its last half second.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from deploy.processes import descendants, proc_stats

TICK = os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in clock ticks
# Roles by a fragment of the command line, first match wins (the centres' workers are `bridgepool centre serve`).
ROLES = (("centre serve", "centre workers"), ("centre supernode", "SuperNodes"),
         ("clients.runtime", "ClientApp runtimes"), ("flwr-serverapp", "ServerApp"), ("superlink", "SuperLink"),
         ("flwr run", "flwr run (follows the run)"), ("fleetgate", "fleet gate"), ("superexec", "SuperExec"))
OTHER = "other"


def role(cmdline: str) -> str:
    return next((name for fragment, name in ROLES if fragment in cmdline), OTHER)


def _sample(root: int) -> dict[int, tuple[str, float]]:
    """Each descendant of `root`: its role and CPU seconds so far (one read of /proc for both)."""
    stats = proc_stats()
    out = {}
    for pid in descendants([root], stats):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone since it was listed
            continue
        fields = stats[pid]
        out[pid] = (role(cmdline), (int(fields[11]) + int(fields[12])) / TICK)  # utime + stime
    return out


class CpuSampler:
    """`with CpuSampler() as cpu: ...; cpu.used(t0, t1)` (times as time.time())."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.samples.append((time.time(), _sample(me)))
            self._stop.wait(self.interval)

    def used(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role between the samples nearest `t0` and `t1`; {} without samples."""
        if not self.samples:
            return {}
        start = min(self.samples, key=lambda s: abs(s[0] - t0))[1]
        end = min(self.samples, key=lambda s: abs(s[0] - t1))[1]
        out: dict[str, float] = {}
        for pid, (name, seconds) in end.items():
            out[name] = out.get(name, 0.0) + seconds - start.get(pid, (name, 0.0))[1]
        return out
