"""Which user a launcher runs submitted bundles as (issue 19, threats 3 and 8).

A bundle's ClientApp is whoever submitted the run's code. The centre's runtime runs it in an app
host (clients/apphost.py) that drops to `--app-user` before the bundle's code runs, so it cannot
read the centre's data, state, ledger or keys. That needs root. So `bridgepool demo`, `run` and
`deploy netns` choose:

  --app-user auto   (default) `nobody` when the launcher runs as root and that user can reach each
                    centre's worker socket and FLWR_HOME (where the bundle is installed); otherwise
                    the launcher's own user, and the log says why
  --app-user none   the launcher's own user (today's behaviour without root)
  --app-user USER   that user; refused, naming the reason, where it cannot work
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from pathlib import Path

from models.config import ConfigError

HELP = ("the user submitted bundles run as (deploy/appuser.py): auto (default: 'nobody' when run as root and it "
        "can reach the centres' worker sockets), none (this process's user), or a user name")
DEFAULT_USER = "nobody"  # exists on every Debian/Ubuntu system and in the image; owns nothing of the centres'


def resolve(choice: str, places: Sequence[Path]) -> tuple[str | None, str]:
    """(the user bundles run as, None for the launcher's own; a line for the log saying which and why).

    `places`: the directories that user must reach: each centre's worker-socket directory and FLWR_HOME,
    made by the launcher before this is called (what does not exist yet, the worker makes 0700)."""
    if choice == "none":
        return None, ("submitted bundles run as the launcher's user (--app-user none): they can read what it "
                      "reads, the centres' data, state and ledger included")
    if os.geteuid() != 0:
        if choice != "auto":
            raise ConfigError(f"--app-user {choice}: needs the launcher to run as root (the centre's runtime "
                              "drops to that user per bundle); run with sudo or pass --app-user none")
        return None, ("not root: submitted bundles run as this user and can read what it reads (the centres' "
                      "data, state, ledger); as root they run as 'nobody' (--app-user)")
    user = DEFAULT_USER if choice == "auto" else choice
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--app-user {user}: no such user on this machine (create it, or pass "
                          "--app-user none)") from None
    umask = os.umask(0)
    os.umask(umask)
    blocked = [str(p) for p in places if not reachable(Path(p), entry.pw_uid, entry.pw_gid)]
    if umask & 0o005:  # the bundle's files, installed under FLWR_HOME by the runtime, must be readable
        blocked.append(f"files made under umask {umask:03o}")
    if blocked:
        why = (f"{user} cannot reach {blocked[0]} (a directory on the way is closed to other users); use a "
               "run directory others may traverse, e.g. under /srv or /tmp")
        if choice != "auto":
            raise ConfigError(f"--app-user {user}: {why}, or pass --app-user none")
        return None, f"submitted bundles run as the launcher's user (root): {why}"
    return user, (f"submitted bundles run as {user} (uid {entry.pw_uid}): no access to the centres' data, state, "
                  "ledger or keys (--app-user none to turn this off)")


def reachable(path: Path, uid: int, gid: int) -> bool:
    """Whether `uid`/`gid` may traverse every directory from / down to `path` (which must exist)."""
    if not path.is_dir():
        return False
    for d in [path, *path.parents]:
        st = d.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def places(state_dirs: Sequence[Path], sockets: Sequence[Path]) -> list[Path]:
    """What the bundles' user must reach, for centres with these state directories and worker sockets:
    each state directory's FLWR_HOME (made here, as the launcher would) and each socket's directory."""
    out: list[Path] = []
    for state, sock in zip(state_dirs, sockets, strict=True):
        (state / "flwr-home").mkdir(parents=True, exist_ok=True)
        out += [state / "flwr-home", sock.parent]
    return out
