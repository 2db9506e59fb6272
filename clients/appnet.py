"""Which network a submitted bundle's app host gets (issue 19, threat 3).

The app host (clients/apphost.py) needs no network: tasks come over pipes from the runtime, and
the bundle's ClientApp reaches the centre only through the worker's Unix socket, a file, which
works across network namespaces. Any socket it could open otherwise is a way out that the
runtime's check of the Flower reply never sees (the data plane's upload port with the token in
the message, the worker's metrics port, whatever the centre's host reaches).

  --app-network auto  (default) none where it can work: the runtime is root, the bundle runs as
                      its own user (--app-user; a root bundle could re-enter the centre's
                      namespace) and `unshare --net` succeeds; otherwise host, and the runtime
                      logs why once at start
  --app-network none  the same, refused with the reason where it cannot work
  --app-network host  the app host shares the runtime's network (sockets of every kind)

"none" starts each app host under `unshare --net` (util-linux): a new network namespace whose only
interface, lo, is down, so every TCP/UDP connection fails (ENETUNREACH) and abstract Unix sockets
are the namespace's own. Done before the interpreter starts, so no thread of the app host (BLAS's
pools included, which a bundle could hijack in-process) is left in the centre's namespace. It
needs CAP_SYS_ADMIN: a Docker container without it (the default; deploy/compose.py does not add
it, see there) gets "host", and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from models.config import ConfigError

CHOICES = ("auto", "none", "host")
DEFAULT = "auto"
HELP = ("the network submitted bundles get (clients/appnet.py): auto (default: none where the runtime is root, "
        "--app-user is set and `unshare --net` works, else host), none (refused where it cannot work), host")
PROBE_TIMEOUT = 10.0  # seconds; `unshare --net true` takes milliseconds


def resolve(choice: str, app_user: str | None, unshare: list[str] | None = None) -> tuple[list[str], str]:
    """(the argv prefix that starts an app host with that network, [] for the runtime's own; a log line
    saying which and why). `unshare`: the command that makes the namespace (tests give a failing one)."""
    if choice not in CHOICES:
        raise ConfigError(f"--app-network {choice!r}: must be one of {', '.join(CHOICES)}")
    if choice == "host":
        return [], "submitted bundles share this centre's network (--app-network host): they can open any socket"
    why = _why_not(app_user, unshare)
    if why is None:
        return [*(unshare or _unshare()), "--net", "--"], (
            "submitted bundles get no network: each app host starts in an empty network namespace "
            "(unshare --net); they reach only the worker's socket")
    if choice == "none":
        raise ConfigError(f"--app-network none: {why}; or pass --app-network host")
    return [], f"submitted bundles share this centre's network (they can open sockets): {why}"


def _unshare() -> list[str]:
    path = shutil.which("unshare")
    return [path] if path else []


def _why_not(app_user: str | None, unshare: list[str] | None) -> str | None:
    """Why an empty network namespace cannot work here, or None when it can."""
    if os.geteuid() != 0:
        return "not root (a new network namespace needs root; run the SuperNode as root with --app-user)"
    if app_user is None:
        return ("no --app-user: a bundle running as root could re-enter the centre's namespace, so none is "
                "made (pass --app-user)")
    argv = unshare or _unshare()
    if not argv:
        return "no `unshare` command (install util-linux)"
    try:
        done = subprocess.run([*argv, "--net", "--", "true"], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`unshare --net` could not run ({err})"
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return (f"`unshare --net` failed ({said}): in a container, that needs CAP_SYS_ADMIN "
                "(README, threat model, row 3)")
    return None
