"""The multi-node topology without Docker: one Linux network namespace per host.

    sudo bridgepool deploy netns --centres 3 --rounds 2 --model tiny

Hosts: `server` (SuperLink, its ServerApp, `flwr run`) and one per centre (its worker and
SuperNode). Each centre's namespace has one veth link, `eth0` (SUBNET.10+i), to a bridge in
the server namespace (SUBNET.1). Bridge ports are *isolated*: a centre reaches the server and
nothing else, the server reaches every centre, and the server namespace forwards nothing.

Every process also runs in a mount namespace and a PID namespace of its own (`unshare --mount
--pid --fork --mount-proc`: its /proc shows only its own processes, /run/netns is hidden) in which the
run's per-host private directories are hidden under a tmpfs, with only its own brought back:
a centre sees its own data (read-only), state and SuperNode key, never another centre's; the
server sees no centre directory at all. Each centre's worker runs as a system user of its own
(`bp-CENTRE`, made once with useradd; `centre_user`), which owns that centre's data (0700) and
state (0700; 0710 for the bundles' group, which reaches the worker socket inside it), so what
keeps another centre's files away is also their owner and mode, not only the mount (issue 19,
threat 8). The SuperNode stays root: its runtime starts each bundle as --app-user.
TLS and SuperNode authentication are on (deploy/pki.sh,
SuperLink certificate with SAN SUBNET.1); command lines come from deploy/commands.py, as for
docker-compose.yml. Everything (processes, namespaces with their veths and bridge) is removed
on exit, error or Ctrl-C. Needs root, `ip` (iproute2), `unshare` and `mount` (util-linux).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import subprocess
from pathlib import Path
from typing import Any

from deploy import commands
from deploy.local import Centre, LaunchError, LocalFederation

USER_PREFIX = "bp-"  # a centre's system user: bp-CENTRE (useradd allows 32 characters)
NOLOGIN = "/usr/sbin/nologin"
SUBNET = "10.77.0"  # inside namespaces this project creates; never on the host's own network
BRIDGE = "br0"


class NetnsFederation(LocalFederation):
    """LocalFederation whose server and centres are separate network + mount namespaces."""

    superlink_host = "0.0.0.0"  # the bridge address for centres; 127.0.0.1 for its own SuperExec
    metrics_host = "0.0.0.0"  # a centre's metrics endpoint, for a Prometheus in the server namespace

    def __init__(self, run_dir: Path, centres: list[Centre], pki_dir: Path | None = None, base_port: int = 9093,
                 threads_per_centre: int = 0, metrics_port: int = 0, prefix: str | None = None,
                 app_user: str | None = None):
        run_dir = Path(run_dir).resolve()
        super().__init__(run_dir, centres, base_port=base_port, threads_per_centre=threads_per_centre,
                         metrics_port=metrics_port, pki=commands.Pki(Path(pki_dir or run_dir / "pki").resolve()),
                         app_user=app_user)
        self.prefix = prefix or f"bp{os.getpid()}"  # unique per launcher: concurrent runs don't collide
        self.namespaces = {"server": f"{self.prefix}-server",
                           **{c.name: f"{self.prefix}-{c.name}" for c in centres}}
        self.addresses = {"server": f"{SUBNET}.1", **{c.name: f"{SUBNET}.{10 + i}" for i, c in enumerate(centres)}}
        self.data_plane_host = self.addresses["server"]
        self._created: list[str] = []
        for c in centres:  # a socket outside the centre's hidden tree would be reachable from the others
            if not c.socket.is_relative_to(c.state_dir):
                raise LaunchError(f"run directory {run_dir} is too deep for {c.name}'s worker socket "
                                  f"({c.state_dir / 'worker.sock'}: over 100 bytes); use a shorter --run-dir")

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> NetnsFederation:
        try:
            self.make_pki()
            self.own_centre_dirs()
            self.create_network()
            super().__enter__()
        except BaseException:
            self.delete_network()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self.delete_network()

    def make_pki(self) -> None:
        assert self.pki is not None
        sans = ["DNS:superlink", "DNS:localhost", "IP:127.0.0.1", f"IP:{self.addresses['server']}"]
        for argv, env in commands.pki_steps(str(Path(__file__).parent), self.pki, [c.name for c in self.centres], sans):
            _run(argv, env={**os.environ, **env})
        # pki.sh makes OUT 0700; the centres' users (not root) read OUT/public (CA certificate, public keys,
        # 0755/0644 by design) through it. Traverse only: ca/ and each centre's key directory stay 0700.
        Path(self.pki.root).chmod(0o711)

    def own_centre_dirs(self) -> None:
        """Each centre's user (made if missing) owns its data (0700) and state (0700). With bundles run as
        another user, that user's group may pass through the state directory to the worker socket (0660)
        and read the SuperNode's FLWR_HOME, where the runtime installs the bundle: state 0710, FLWR_HOME
        0750, both of that group. Another centre's user, and root's files, get permission denied even
        where a mount does not hide them."""
        bundles_gid = pwd.getpwnam(self.app_user).pw_gid if self.app_user else None
        for c in self.centres:
            user = ensure_user(centre_user(c.name))
            home = c.state_dir / "flwr-home"  # made here, before the SuperNode (root) writes into it
            home.mkdir(parents=True, exist_ok=True)
            if c.data_dir.is_dir():  # a missing corpus: the worker fails at start naming it, as without users
                _run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(c.data_dir)])
                c.data_dir.chmod(0o700)
            _run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(c.state_dir)])
            if bundles_gid is None:
                c.state_dir.chmod(0o700)
                home.chmod(0o700)
            else:
                for d, mode in ((c.state_dir, 0o710), (home, 0o750)):
                    os.chown(d, user.pw_uid, bundles_gid)
                    d.chmod(mode)

    def create_network(self) -> None:
        server = self.namespaces["server"]
        for ns in self.namespaces.values():
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", server, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", server, "addr", "add", f"{self.addresses['server']}/24", "dev", BRIDGE])
        _run(["ip", "-n", server, "link", "set", BRIDGE, "up"])
        for i, c in enumerate(self.centres):
            port, ns = f"veth{i}", self.namespaces[c.name]
            _run(["ip", "-n", server, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", server, "link", "set", port, "master", BRIDGE])
            # Isolated bridge ports forward only to non-isolated ones (the bridge itself, i.e. the
            # server): no frame passes from one centre to another.
            _run(["ip", "-n", server, "link", "set", "dev", port, "type", "bridge_slave", "isolated", "on"])
            _run(["ip", "-n", server, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[c.name]}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def delete_network(self) -> None:
        """Delete every namespace this launcher made (their veths and bridge go with them)."""
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created.clear()

    # ------------------------------------------------- LocalFederation hooks
    @property
    def superlink_address(self) -> str:
        return f"{self.addresses['server']}:{self.superlink_port}"

    def _wrap(self, where: str, argv: list[str]) -> list[str]:
        """ip netns exec NS unshare --mount --pid -- sh -c HIDE argv: `where`'s network, private mounts and PIDs.

        A PID namespace of its own (`--pid --fork --mount-proc`): the command is its PID 1, its /proc lists
        only its own processes, so `/proc/1/root` is its own hidden tree and no other host's process (nor its
        /proc/PID/ns/*) is there to enter (issue 19, threat 8). `--kill-child`: it dies with its launcher."""
        return ["ip", "netns", "exec", self.namespaces[where], "unshare", "--mount", "--propagation", "private",
                "--pid", "--fork", "--mount-proc", "--kill-child",
                "--", "sh", "-c", self.mount_script(where) + ' exec "$@"', "sh", *argv]

    def mount_script(self, where: str) -> str:
        """Shell run as root in the new mount namespace before the command itself."""
        assert self.pki is not None
        lines = ["set -e"]
        stash = self.run_dir / ".mnt" / where
        # Per-host private trees: tmpfs over the whole tree, then only this host's own part moved back.
        for tree in (self.run_dir / "centres", Path(self.pki.root) / "centres"):
            own = tree / where
            if where != "server" and own.is_dir():
                lines += [f"mkdir -p {_q(stash)}", f"mount --bind {_q(own)} {_q(stash)}"]
            lines += [f"mount -t tmpfs -o size=1m,mode=0755 bridgepool-hidden {_q(tree)}"]
            if where != "server" and own.is_dir():
                lines += [f"mkdir -p {_q(own)}", f"mount --move {_q(stash)} {_q(own)}"]
        lines += [f"mount -t tmpfs -o size=1m,mode=0700 bridgepool-hidden {_q(Path(self.pki.root) / 'ca')}"]
        # The other hosts' network namespaces (ip netns's bind mounts), which a root process could enter.
        lines += ["if [ -d /run/netns ]; then mount -t tmpfs -o size=1m,mode=0755 bridgepool-hidden /run/netns; fi"]
        if where != "server":  # the centre's corpus: read-only even to its own processes
            data = self._centre(where).data_dir
            lines += [f"mount --bind {_q(data)} {_q(data)}", f"mount -o remount,bind,ro {_q(data)}"]
        return "; ".join(lines) + ";"

    def _spawn(self, where: str, name: str, argv: list[str], log: Path, env: dict[str, str],
               cwd: Path | None = None) -> Any:
        """A centre's worker runs as the centre's user (its SuperNode stays root: its runtime starts each
        bundle as --app-user, which needs root)."""
        if where != "server" and name.startswith("worker "):
            user = pwd.getpwnam(centre_user(where))
            # The bundles' group as the worker's only supplementary one (its user is no member of it):
            # the worker gives its socket that group (`centre serve --socket-group`).
            groups = [f"--groups={pwd.getpwnam(self.app_user).pw_gid}"] if self.app_user else ["--clear-groups"]
            argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", *groups,
                    "--no-new-privs", "--", *argv]
            env = {**env, "HOME": str(self._centre(where).state_dir), "USER": user.pw_name}
        return super()._spawn(where, name, argv, log, env, cwd)

    def _superlink_up(self) -> bool:
        # The ports are in another namespace: read uvicorn's own word, the SuperLink's and the gate's.
        return all(log.exists() and "Uvicorn running on" in log.read_text(errors="replace")
                   for log in (self.logs / "superlink.log", self.logs / "fleetgate.log"))


def centre_user(centre: str) -> str:
    """The system user a centre's worker runs as: bp-CENTRE, or for a long name its first 20 characters
    and a hash of the whole (two long names sharing a prefix stay two users)."""
    name = USER_PREFIX + centre
    if len(name) <= 32:
        return name
    return f"{USER_PREFIX}{centre[:20]}-{hashlib.sha256(centre.encode()).hexdigest()[:8]}"


def ensure_user(name: str) -> pwd.struct_passwd:
    """The system user `name` (no home, no login shell, a group of its own), made if missing. Idempotent."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--shell", NOLOGIN, "--user-group", name])
        return pwd.getpwnam(name)


def netns_available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (run with sudo)"
    for tool in ("ip", "unshare", "mount", "setpriv", "useradd"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"`{tool}` not found (Debian: iproute2, util-linux, mount, passwd)"
    return None


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if done.returncode:
        raise LaunchError(f"`{shlex.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}")


def _q(path: Path) -> str:
    return shlex.quote(str(path))
