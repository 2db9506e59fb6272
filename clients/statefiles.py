"""A centre's state files (clients/training.py): confined to its state directory, written whole or
not at all, the oldest rounds' dropped, and the inner-optimiser state written over the bytes of a
file already there. Kept apart from the trainer, which decides what to write and when."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from models.config import check_run_name

KEEP_OPTIM_ROUNDS = 3  # files of one kind kept on disk (the inner state's: checkpoint-keep)


class StatePathError(ValueError):
    """A state file would resolve outside the centre's state directory."""


def run_state_dir(state_root: Path, run_name: str) -> Path:
    """STATE_ROOT/RUN_NAME, refused unless the name is one safe path component and the
    directory (symlinks followed) lies inside STATE_ROOT. The worker's operator chose
    STATE_ROOT; the run-name comes from whoever submitted the run (issue 19, threat 4)."""
    check_run_name(run_name)
    return inside(state_root, Path(state_root) / run_name)


def inside(root: Path, path: Path) -> Path:
    """`path` if, resolved, it is `root` or below it; else StatePathError naming both."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise StatePathError(f"state path {path} resolves to {real}, outside the state directory {real_root}; "
                             "refused (a run-name or a symlink pointing elsewhere)")
    return Path(path)


def keep_file(state_dir: Path, path: Path, write: Callable[[Path], None], recycle: bool = False,
              keep: int = KEEP_OPTIM_ROUNDS) -> None:
    """Write `path` whole or not at all (a crash leaves the newer rounds' files), then drop
    all but the newest `keep` files of its kind (same name but the round number; 0: none go).
    `recycle`: the oldest of them, due to go, is first renamed to the temporary name, for `write`
    to write over in place (`save_in_place`). A crash's leftover temporary file of another round
    goes."""
    tmp = inside(state_dir, path.with_suffix(".tmp"))
    kind = path.name.rsplit("-", 1)[0] + "-*" + path.suffix
    for stale in state_dir.glob(kind[:-len(path.suffix)] + ".tmp"):
        if stale != tmp:
            inside(state_dir, stale).unlink()
    if recycle:
        olds = [p for p in sorted(state_dir.glob(kind)) if p != path]
        if keep and len(olds) >= keep:
            inside(state_dir, olds[0]).replace(tmp)
    write(tmp)
    tmp.replace(path)
    for old in sorted(state_dir.glob(kind))[:-keep] if keep else []:
        inside(state_dir, old).unlink()


def save_in_place(state: dict, path: Path) -> None:
    """torch.save `state` to `path`, over the bytes of the file already there, if any (then cut to
    size). The inner AdamW state is 8 bytes per parameter, written every round: into a new file the
    kernel must find and zero fresh pages (~1-2 s per GB on a 2-core machine, taking the cores the
    round's upload needs), over a file still in the page cache it only copies (~0.5 s)."""
    try:
        f = open(path, "r+b" if path.exists() else "wb")
    except PermissionError:  # a file this user may not write (left by another): a new one, as torch.save makes
        path.unlink()
        f = open(path, "wb")
    with f:
        torch.save(state, f)
        f.truncate()

