"""benchmarks/cpuuse.py: a descendant's CPU seconds land in its role's share of the window."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks import cpuuse


def test_roles_come_from_the_command_line():
    assert cpuuse.role("/venv/bin/python /venv/bin/bridgepool centre serve --centre fr") == "centre workers"
    assert cpuuse.role("/venv/bin/python3.11 /venv/bin/flwr-serverapp --token x") == "ServerApp"
    assert cpuuse.role("python -c pass") == cpuuse.OTHER


def test_a_busy_child_is_counted_inside_the_window_and_not_outside_it():
    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
            "print('burnt', flush=True)\ntime.sleep(2.0)")
    with cpuuse.CpuSampler(interval=0.1) as cpu:
        t0 = time.time()
        child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"  # ~1 s of CPU, however long
        time.sleep(0.3)  # a sample after the burn, the child still alive (asleep)
        t1 = time.time()
        time.sleep(0.5)
        child.wait()
    assert 0.9 <= cpu.used(t0, t1).get(cpuuse.OTHER, 0.0) <= 1.6  # the burn and the interpreter's start
    assert cpu.used(t1 + 0.1, time.time()).get(cpuuse.OTHER, 0.0) < 0.3  # it slept after its burn
