"""The centre's SuperNode launcher (clients/supernode.py): what it changes in Flower's SuperNode.

The end-to-end proof that a warm SuperNode federates is every real-Flower test
(LocalFederation uses it by default); the benchmark's fixed-cost rows compare it
with stock `flower-supernode` side by side. Here: the two waits it replaces, and
the flags it hands to Flower.
"""

from __future__ import annotations

import inspect

import pytest
from flwr.supernode import start_client_internal

from clients import supernode


def test_the_waits_it_replaces_are_still_flowers_literals():
    """If a Flower upgrade moves these sleeps, the launcher would silently tune nothing."""
    source = inspect.getsource(start_client_internal)
    assert source.count(f"time.sleep({supernode._STOCK_IDLE})") == 1
    assert source.count(f"time.sleep({supernode._STOCK_REPLY})") == 2


def test_clock_replaces_only_the_two_waits(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    clock = supernode._clock(idle=0.2, reply=0.05)
    clock.sleep(3)      # idle pull
    clock.sleep(0.5)    # waiting for the ClientApp's reply
    clock.sleep(1.25)   # anything else passes through
    assert slept == [0.2, 0.05, 1.25]
    assert clock.time is supernode.time.time and clock.monotonic is supernode.time.monotonic


def test_idle_pulls_back_off_with_the_time_since_the_last_message(monkeypatch):
    now = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    monkeypatch.setattr(supernode.time, "monotonic", lambda: now[0])
    clock = supernode._clock(idle=0.2, reply=0.05)
    clock.sleep(3)  # just started: fast
    now[0] += 10.0
    clock.sleep(3)  # 10 s idle: 5 % of it
    now[0] += 60.0
    clock.sleep(3)  # long idle: capped
    clock.sleep(0.5)  # a message is being handled: fast again after it
    clock.sleep(3)
    assert slept == [0.2, pytest.approx(0.5), supernode.SLOW_IDLE_SECONDS, 0.05, 0.2]


def test_runtime_polls_fast_only_right_after_a_task(monkeypatch):
    """The warm runtime's task polls cost the SuperNode CPU the centre's training needs:
    fast just after a task ends (the next round follows), slower the longer it idles,
    slow while a task runs."""
    from clients import runtime

    now = [50.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    rt = runtime.WarmRuntime.__new__(runtime.WarmRuntime)
    rt._tasks_lock, rt._running, rt._last_ended = __import__("threading").Lock(), 0, now[0]
    assert rt.poll_wait() == runtime.POLL_SECONDS
    now[0] += 4.0
    assert rt.poll_wait() == pytest.approx(0.2)
    now[0] += 100.0
    assert rt.poll_wait() == runtime.SLOW_POLL_SECONDS
    rt._running = 1
    assert rt.poll_wait() == runtime.BUSY_POLL_SECONDS


@pytest.mark.parametrize("given", [[], ["--isolation", "subprocess"], ["--isolation=subprocess"]])
def test_warm_forces_process_isolation(given):
    args = ["--insecure", *given, "--port", "9094"]
    out = supernode._isolation(args, "process")
    assert out[-2:] == ["--isolation", "process"] and out.count("--isolation") == 1
    assert "--isolation=subprocess" not in out and "subprocess" not in out
    assert supernode._isolation(args, None) == args  # --no-warm: Flower's flags untouched


def test_bad_poll_value_is_refused_with_its_flag():
    with pytest.raises(SystemExit, match="--idle-poll"):
        supernode.main(["--idle-poll", "0", "--insecure"])
