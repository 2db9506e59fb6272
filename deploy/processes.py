"""Starting and stopping the federation's OS processes, and checking ports.

Each process gets its own session (process group), so stopping it also stops
what it spawned (SuperLink -> SuperExec -> ServerApp; SuperNode -> SuperExec ->
ClientApp). Every started process is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class LaunchError(RuntimeError):
    """A process could not be started or died; the message names it and its log."""


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's environment (no PATH needed)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def check_port_free(port: int, what: str, host: str = "127.0.0.1", flag: str = "--base-port") -> None:
    check_port_range(port, 1, what, flag)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except PermissionError as err:
            raise LaunchError(f"port {port} ({what}) on {host} needs root (ports below 1024 are privileged); "
                              f"choose a port >= 1024 with {flag}") from err
        except OSError as err:
            raise LaunchError(
                f"port {port} ({what}) on {host} is already in use; stop what holds it "
                f"(`ss -ltnp 'sport = :{port}'`) or choose other ports with {flag}"
            ) from err


def check_port_range(first: int, count: int, what: str, flag: str) -> None:
    """`count` consecutive TCP ports from `first` exist (1-65535); else a LaunchError naming the flag.
    Checked before anything starts: an out-of-range port would otherwise end in an OverflowError."""
    last = first + count - 1
    if first < 1 or last > 65535:
        span = f"ports {first}-{last}" if count > 1 else f"port {first}"
        raise LaunchError(f"{flag} {first}: {what} would use {span}, but TCP ports are 1-65535; "
                          f"choose {flag} between 1024 and {65535 - count + 1}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    argv: list[str] = field(default_factory=list)  # how it was started, for `ProcessGroup.restart`
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class ProcessGroup:
    """Owns every process the launcher started."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str],
              cwd: Path | None = None) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log, list(argv), dict(env), cwd)
        self.procs.append(proc)
        return proc

    def kill(self, names: list[str]) -> list[Proc]:
        """SIGKILL the named processes and everything they spawned (a crash, not a shutdown:
        nothing gets to say goodbye); they leave the group and are returned for `restart`."""
        doomed = [p for p in self.procs if p.name in names]
        tree = descendants([p.popen.pid for p in doomed])
        for proc in doomed:
            _signal_group(proc.popen, signal.SIGKILL)
        _signal_pids(tree, signal.SIGKILL)
        for proc in doomed:
            proc.popen.wait(10)
            self.procs.remove(proc)
        return doomed

    def restart(self, proc: Proc) -> Proc:
        """Start `proc` again, as it was started, appending to its log."""
        return self.start(proc.name, proc.argv, proc.log, proc.env, proc.cwd)

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise LaunchError(f"{proc.name} exited with code {proc.popen.returncode}; "
                                  f"last lines of {proc.log}:\n{proc.tail()}")

    def stop_all(self, grace: float = 8.0) -> None:
        """SIGTERM every process and everything it spawned, SIGKILL what is left after `grace` s.

        Flower's SuperExec starts the ServerApp/ClientApp in sessions of their own, so
        signalling our process groups is not enough: the whole tree is snapshotted
        first (before any parent dies and its children are re-parented to init).
        """
        tree = descendants([p.popen.pid for p in self.procs])
        for proc in reversed(self.procs):
            _signal_group(proc.popen, signal.SIGTERM)
        _signal_pids(tree, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in self.procs:
            _signal_group(proc.popen, signal.SIGKILL)  # children that ignored SIGTERM
        _signal_pids(_alive(tree), signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()


def proc_stats() -> dict[int, list[str]]:
    """Each live process's /proc/PID/stat fields after its command name (which may hold spaces):
    [0] state, [1] parent pid, ... [11] utime, [12] stime (proc(5) fields 3 on)."""
    out: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            out[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since it was listed
            continue
    return out


def descendants(roots: list[int], stats: dict[int, list[str]] | None = None) -> set[int]:
    """All live descendants of `roots` (from /proc, or `stats` already read), roots excluded."""
    children: dict[int, list[int]] = {}
    for pid, fields in (proc_stats() if stats is None else stats).items():
        children.setdefault(int(fields[1]), []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.add(pid)
        except ProcessLookupError:
            pass
    return alive


def _signal_pids(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate, timeout: float, what: str, group: ProcessGroup, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        group.check_alive()
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_base_port(span: int) -> int:
    """A base port followed by `span` - 1 more free ports (for a federation's SuperLink and nodes)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span < 65000 and all(_port_free(base + i) for i in range(span)):
            return base
    raise LaunchError("no range of free loopback ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
