"""A centre's SuperNode: Flower's own `flower-supernode`, with its per-round waits cut.

Measured on 2 cores (benchmarks/results/), stock Flower 1.41 spends ~6 s of every
round outside any computation. Three causes, all on the centre's side:

1. After it pushes a reply, the SuperNode's loop pulls for the next message at once;
   the server has not sent it yet (it is still collecting the other centres'
   replies), so the pull is empty and the loop sleeps a hard-coded 3 s
   (flwr/supernode/start_client_internal.py) before it looks again. Waiting for a
   reply polls every 0.5 s. Neither is a flag; here both are (`--idle-poll`,
   `--reply-poll`), by replacing the `time.sleep` that module calls. Each idle
   poll is one small HTTP request to the SuperLink.
2. An object not yet stored when first pulled costs a 1 s back-off (see fast_pull).
3. Every message starts SuperExec's fresh `flwr-clientapp` process. With `--warm`
   (the default) the SuperNode runs with `--isolation process` and this launcher
   starts clients/runtime.py as its child instead: one process that stays up.

Everything else is Flower's SuperNode, unchanged, taking all of its own flags:

    bridgepool centre supernode [--idle-poll S] [--reply-poll S] [--no-warm] FLOWER-SUPERNODE-FLAGS...
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from clients import appnet

log = logging.getLogger("bridgepool.supernode")
IDLE_POLL_SECONDS = 0.2  # stock: 3.0
REPLY_POLL_SECONDS = 0.05  # stock: 0.5
# Fast idle pulls matter between rounds (the server is aggregating; seconds at most). The
# longer the node has waited, the less a late pull costs: the pause grows to IDLE_BACKOFF_FRACTION
# of the time since its last message (<= 5 % added to the gap), up to SLOW_IDLE_SECONDS, so a
# centre waiting on a straggler or between runs costs the SuperLink ~2 requests/s.
IDLE_BACKOFF_FRACTION = 0.05
RUNTIME_RESTART_SECONDS = 1.0
PULL_BACKOFF_SECONDS, PULL_BACKOFF_CAP_SECONDS = 0.02, 1.0  # stock: 1 s doubling to 10 s
SLOW_IDLE_SECONDS = 0.5
_STOCK_IDLE, _STOCK_REPLY = 3, 0.5  # the literals in flwr 1.41's start_client_internal.py


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridgepool centre supernode", add_help=False,
                                description="Flower's SuperNode with a warm ClientApp runtime and short polls")
    p.add_argument("--idle-poll", type=float, default=IDLE_POLL_SECONDS,
                   help=f"seconds between pulls while no message waits (stock Flower: {_STOCK_IDLE})")
    p.add_argument("--reply-poll", type=float, default=REPLY_POLL_SECONDS,
                   help=f"seconds between checks for the ClientApp's reply (stock Flower: {_STOCK_REPLY})")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="run ClientApps in one long-lived runtime process (clients/runtime.py) instead of a "
                        "new flwr-clientapp process per message")
    p.add_argument("--app-user", default=None,
                   help="run submitted bundles as this user (needs root; with --warm): it reads neither the "
                        "centre's data nor its state, ledger or keys; start the worker with --socket-group "
                        "set to this user's group")
    p.add_argument("--app-network", default=appnet.DEFAULT, choices=appnet.CHOICES, help=appnet.HELP)
    return p


def main(argv: Sequence[str]) -> None:
    ours, flower_args = parser().parse_known_args(list(argv))
    for name in ("idle_poll", "reply_poll"):
        if not 0.01 <= getattr(ours, name) <= 60:
            raise SystemExit(f"--{name.replace('_', '-')} must be between 0.01 and 60 seconds")
    flower_args = _isolation(flower_args, "process" if ours.warm else None)
    from flwr.common.logger import update_console_handler
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    update_console_handler(timestamps=True, colored=False)  # its log is a file an operator reads: when, not colour
    start_client_internal.time = _clock(ours.idle_poll, ours.reply_poll)  # type: ignore[attr-defined]
    start_client_internal.pull_objects = fast_pull(start_client_internal.pull_objects)  # type: ignore[attr-defined]
    if ours.app_user and not ours.warm:
        raise SystemExit("--app-user needs the warm runtime (--warm): stock flwr-clientapp runs as this user")
    if ours.app_network == "none" and not ours.warm:
        raise SystemExit("--app-network none needs the warm runtime (--warm): stock flwr-clientapp shares this "
                         "process's network")
    if ours.warm:
        _start_runtime(flower_args, ours.app_user, ours.app_network)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


def fast_pull(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's `pull_objects` with a short first retry.

    A message is announced before its objects are stored, so the first pull of an
    object often finds it missing; Flower then backs off 1 s, doubling to 10 s
    (PULL_INITIAL_BACKOFF): ~1 s lost per hop per round for a few-millisecond race.
    """
    return functools.partial(pull_objects, initial_backoff=PULL_BACKOFF_SECONDS, backoff_cap=PULL_BACKOFF_CAP_SECONDS)


def _clock(idle: float, reply: float) -> types.SimpleNamespace:
    """The `time` module as start_client_internal.py sees it, with its two fixed waits replaced."""
    stock_sleep, clock = time.sleep, time.monotonic
    last_busy = [clock()]  # when the node last waited on a ClientApp (i.e. handled a message)

    def sleep(seconds: float) -> None:
        now = clock()
        if seconds == _STOCK_IDLE:
            seconds = min(max(idle, SLOW_IDLE_SECONDS), max(idle, IDLE_BACKOFF_FRACTION * (now - last_busy[0])))
        elif seconds == _STOCK_REPLY:
            # Waiting for the reply checks this process's own memory (NodeState), no request: every `reply`
            # s throughout costs ~0.3 % of a core (measured), and the reply leaves at most `reply` s after it
            # is ready. (Slow polls until 80 % of the last wait cost round 2 up to 0.5 s: round 1 is longer.)
            last_busy[0], seconds = now, reply
        stock_sleep(seconds)

    names = {n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    return types.SimpleNamespace(**{**names, "sleep": sleep})


def _isolation(args: list[str], mode: str | None) -> list[str]:
    """`args` with `--isolation mode` (replacing any given), or unchanged when mode is None."""
    if mode is None:
        return args
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--isolation":
            skip = i + 1 < len(args)
            continue
        if arg.startswith("--isolation="):
            continue
        out.append(arg)
    return [*out, "--isolation", mode]


def _flag(args: list[str], name: str, default: str | None) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def _start_runtime(flower_args: list[str], app_user: str | None = None,
                   app_network: str = appnet.DEFAULT) -> subprocess.Popen:
    """clients/runtime.py as this process's child, on the Runtime API the SuperNode is about to serve."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

    host = _flag(flower_args, "--host", UVICORN_DEFAULT_HOST) or UVICORN_DEFAULT_HOST
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    port = _flag(flower_args, "--port", str(SUPERNODE_UVICORN_DEFAULT_PORT))
    argv = [sys.executable, "-m", "clients.runtime", "--runtime-api-address",
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "--parent-pid", str(os.getpid())]
    ca = _flag(flower_args, "--ssl-ca-certfile", None)
    if ca:
        argv += ["--root-certificates", ca]
    if app_user:
        argv += ["--app-user", app_user]
    argv += ["--app-network", app_network]  # resolved by the runtime, which knows whether it can unshare
    proc = subprocess.Popen(argv)  # noqa: S603 - our own module, no shell
    threading.Thread(target=_supervise, args=(proc, argv), daemon=True, name="runtime-supervisor").start()
    return proc


def _supervise(proc: subprocess.Popen, argv: list[str]) -> None:
    """Start the runtime again if it dies while the SuperNode lives: without it no ClientApp runs,
    and the centre would silently miss every round. (It exits by itself when the SuperNode does.)"""
    while True:
        code = proc.wait()
        if code < 0:  # killed by a signal: stopped on purpose (with the SuperNode's process tree)
            return
        log.warning("warm ClientApp runtime exited with %s; starting it again", code)
        time.sleep(RUNTIME_RESTART_SECONDS)
        proc = subprocess.Popen(argv)  # noqa: S603
