"""The project image, built where no image registry can be reached (this project's machines, CI).

    base:   deploy/docker-base.sh -> bridgepool-base:bookworm (debootstrap + docker import)
    wheels: torch's CPU wheel and every dependency, `pip download`ed once on the host into
            BRIDGEPOOL_CACHE/wheels and hard-linked into deploy/wheels/ (the build context)
    image:  deploy/Dockerfile with BASE_IMAGE=the base, WITH_PROMETHEUS=1, `--network host`
            (its apt-get reaches Debian's mirror; pip installs from the wheels, --no-index)

Both caches live outside the checkout (default /var/cache/bridgepool), so a fresh clone or a
fresh Docker data root reuses them: a second build only imports the base and builds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "deploy" / "wheels"
IMAGE = "bridgepool:0.1.0"  # deploy/compose.py's
BASE_IMAGE = "bridgepool-base:bookworm"
TORCH = "torch==2.13.0+cpu"  # pyproject's pin, the CPU build: never PyPI's multi-GB CUDA wheel
BUILD_TOOLS = ["setuptools>=68"]  # the Dockerfile builds this package with --no-build-isolation


def cache_dir() -> Path:
    return Path(os.environ.get("BRIDGEPOOL_CACHE", "/var/cache/bridgepool"))


def requirements() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def _run(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n"
                           f"{(done.stdout + done.stderr).strip()[-3000:]}")


def fill_wheels(cache: Path | None = None) -> list[Path]:
    """Every wheel the image needs in deploy/wheels/, downloaded once into the cache.

    The cache is keyed by the dependency list: a changed pin downloads again (into the same
    directory, so unchanged wheels are not fetched twice)."""
    cached = (cache or cache_dir()) / "wheels"
    cached.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256("\n".join([TORCH, *requirements(), *BUILD_TOOLS]).encode()).hexdigest()[:16]
    stamp = cached / f".complete-{key}"
    if not stamp.exists():
        pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(cached), "--only-binary=:all:"]
        _run([*pip, "--no-deps", TORCH], f"downloading {TORCH} (pip download)")
        # The CPU torch wheel just fetched satisfies pyproject's torch==2.13.0 (2.13.0+cpu sorts higher).
        _run([*pip, "--find-links", str(cached), *requirements(), *BUILD_TOOLS], "downloading the wheels")
        stamp.touch()
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    out = []
    for wheel in sorted(cached.glob("*.whl")):
        target = WHEELS / wheel.name
        try:
            os.link(wheel, target)  # same disk: no copy
        except OSError:
            shutil.copy2(wheel, target)
        out.append(target)
    return out


def ensure_base(docker: str = "docker", image: str = BASE_IMAGE, env: dict[str, str] | None = None) -> None:
    env = dict(env or os.environ)
    if shutil.which("debootstrap") is None and subprocess.run(
            [docker, "image", "inspect", image], capture_output=True, env=env).returncode != 0 \
            and not (cache_dir() / "base-bookworm.tar").exists():
        raise RuntimeError("no base image and no debootstrap to make one: apt-get install debootstrap "
                           "(or pass --base-image with an image that has python3.11 and its venv module)")
    _run(["sh", str(ROOT / "deploy" / "docker-base.sh"), image], f"making the base image {image}",
         env={**env, "DOCKER": docker})


def build(docker: str = "docker", *, offline: bool = True, base_image: str | None = None,
          tag: str = IMAGE, env: dict[str, str] | None = None) -> None:
    """docker build of deploy/Dockerfile; offline: from the debootstrap base and the cached wheels."""
    args = ["--build-arg", "WITH_PROMETHEUS=1"] if offline else []
    if offline:
        base = base_image or BASE_IMAGE
        if base_image is None:
            ensure_base(docker, base, env)
        fill_wheels()
        args += ["--build-arg", f"BASE_IMAGE={base}"]
    _run([docker, "build", "--network", "host", "-q", "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", tag,
          *args, str(ROOT)], f"building {tag}", env=env)
