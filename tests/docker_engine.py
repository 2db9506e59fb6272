"""A private Docker engine for tests: its own data root, exec root, pidfile and socket.

Debian's dockerd (docker.io, 20.10) with overlay2 (layers shared between containers; vfs would
copy the whole image for each one), `--iptables=false --bridge=none` (user-defined networks still
work, Compose's `internal: true` ones included). Stopped by its own pid, its mounts undone and its
directory removed at the end: it never touches another engine on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class EngineUnavailable(RuntimeError):
    """No Docker engine can start here; the message says why."""


class PrivateEngine:
    def __init__(self, parent: str = "/var/tmp") -> None:
        self.dockerd = shutil.which("dockerd")
        # The client that came with this dockerd (another `docker` earlier on PATH may be newer/older).
        client = Path(self.dockerd).with_name("docker") if self.dockerd else None
        self.docker = str(client) if client and client.exists() else (shutil.which("docker") or "docker")
        self.parent = parent
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        assert self.dir is not None
        return {**os.environ, "DOCKER_HOST": f"unix://{self.dir / 'sock'}"}

    def start(self, timeout: float = 90) -> PrivateEngine:
        if os.geteuid() != 0:
            raise EngineUnavailable("not root: dockerd needs root here (no rootless setup)")
        if self.dockerd is None:
            raise EngineUnavailable("no dockerd on PATH (Debian: apt-get install docker.io)")
        # A short path: the socket's must fit in 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="bp-docker-", dir=self.parent))
        d = self.dir
        log = (d / "log").open("wb")
        self.proc = subprocess.Popen(
            [self.dockerd, "--data-root", str(d / "root"), "--exec-root", str(d / "exec"), "--pidfile",
             str(d / "pid"), "-H", f"unix://{d / 'sock'}", "--storage-driver", "overlay2", "--iptables=false",
             "--bridge=none"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            done = subprocess.run([self.docker, "info", "--format", "{{.Driver}}"], capture_output=True, text=True,
                                  env=self.env)
            if done.returncode == 0:
                if done.stdout.strip() != "overlay2":
                    self.stop()
                    raise EngineUnavailable(f"dockerd runs with storage driver {done.stdout.strip()!r}, not overlay2")
                return self
            time.sleep(0.5)
        tail = (d / "log").read_text(errors="replace")[-1500:]
        self.stop()
        raise EngineUnavailable(f"dockerd did not start within {timeout:.0f}s: {tail}")

    def stop(self) -> None:
        """Stop our dockerd by its pid (containers stop with it), undo its mounts, remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.dir is None:
            return
        # Whatever it left mounted under its directory (exec/netns/default, overlay mounts), deepest first.
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(str(self.dir) + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
