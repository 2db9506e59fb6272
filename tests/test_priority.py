"""A centre worker's `--nice` (clients/priority.py): lower in its own session's autogroup too, where the
kernel weighs sessions rather than processes (the workers run in sessions of their own)."""

from __future__ import annotations

import subprocess
import sys

from clients.priority import AUTOGROUP

PROBE = ("import os; from clients.priority import AUTOGROUP, lower_priority; lower_priority(5); "
         "print(os.nice(0)); print(AUTOGROUP.read_text().strip() if AUTOGROUP.exists() else 'none')")


def test_a_lowered_worker_is_lowered_in_its_session_as_well():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          start_new_session=True)  # as deploy/processes.py starts a worker
    nice, group = done.stdout.split("\n")[:2]
    assert int(nice) == 5
    if AUTOGROUP.exists():  # this kernel groups by session: the group is what the scheduler weighs
        assert group.endswith("nice 5"), group
    else:
        assert group == "none"
