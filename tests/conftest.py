"""Shared fixtures: small real corpora prepared once per session, free ports."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from clients.data import DEFAULT_CENTRES, prepare_centre
from clients.worker import CentreWorker
from deploy.local import Centre, centre_dirs
from deploy.processes import free_base_port  # noqa: F401  (re-exported for tests)
from server.checkpoint import checkpoint_dir, latest_checkpoint

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
SMALL_BYTES = 80_000  # per centre: real man-page prose, enough for tiny-model rounds


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for name, source in DEFAULT_CENTRES:
        prepare_centre(source, root / name, max_bytes=SMALL_BYTES)
        out[name] = root / name
    return out


def make_centres(run_dir: Path, corpora: dict[str, Path], n: int) -> list[Centre]:
    centres = []
    for name, _ in DEFAULT_CENTRES[:n]:
        c = centre_dirs(run_dir, name)
        shutil.copytree(corpora[name], c.data_dir)
        centres.append(c)
    return centres


def wait_for_checkpoint(run_dir: Path, rnd: int, timeout: float = 60.0) -> None:
    """Until round `rnd`'s checkpoint (or a newer one) is on disk. run.json lists a round as soon as
    its step is taken; its checkpoint is written in the background after that (server/app.py), so a
    test that kills the coordinator on seeing the round must wait for it to resume from that round."""
    deadline = time.monotonic() + timeout
    while (ckpt := latest_checkpoint(run_dir)) is None or ckpt.round < rnd:  # what a resumed run would start from
        assert time.monotonic() < deadline, f"no checkpoint of round {rnd} in {checkpoint_dir(run_dir)} " \
                                            f"after {timeout:.0f}s"
        time.sleep(0.05)


@pytest.fixture()
def worker(tmp_path) -> CentreWorker:
    """A real centre worker (in this process) on a small prepared corpus."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(f"Document {i}. " + "Some ordinary prose for a tiny model. " * 20)
    prepare_centre(str(docs), tmp_path / "data")
    return CentreWorker("fr-genci", tmp_path / "data", tmp_path / "state")


@pytest.fixture()
def short_tmp():
    """A directory with a short path, which any local user may traverse: pytest's own tmp_path is
    too deep for some AF_UNIX socket paths (107 bytes) and readable by root only."""
    root = Path(tempfile.mkdtemp(prefix="bp-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)
