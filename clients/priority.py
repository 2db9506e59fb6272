"""A centre process's lower CPU priority, in effect also where the kernel weighs sessions, not processes.

With autogroup scheduling (Linux's default where /proc/sys/kernel/sched_autogroup_enabled is 1), a
process's nice value weighs only against the processes of its own session, and every session gets
an equal share of the CPU. The centre workers run in sessions of their own (deploy/processes.py), so
`os.nice` alone changed nothing between a worker and the coordinator beside it: measured on 2 cores
with the `base` model, round 1's aggregation took 5.3 s while both centres trained their next round's
first steps (overlap-steps), and 2.7 s with the workers' sessions lowered (later rounds ~0.8 s). What
the scheduler weighs is the session's own nice value, /proc/self/autogroup; a process may raise it
(lower its priority) without privileges.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("bridgepool.centre")
AUTOGROUP = Path("/proc/self/autogroup")  # "/autogroup-N nice K"; absent without CONFIG_SCHED_AUTOGROUP


def lower_priority(nice: int) -> None:
    """This process `nice` steps lower, and its session's autogroup at least as low (where there is one)."""
    if nice <= 0:
        return
    os.nice(nice)
    try:
        current = int(AUTOGROUP.read_text().split()[-1])
        if current < nice:
            AUTOGROUP.write_text(f"{nice}\n")
    except (OSError, ValueError, IndexError) as err:  # no autogroup here: os.nice is what counts
        log.debug("autogroup nice not set (%s): the process's nice value alone applies", err)
