"""`bridgepool deploy up` / `bridgepool deploy down`: docker-compose.yml, brought up and down.

    bridgepool deploy up [--offline] [--set model=tiny --set rounds=3]   # build, start, wait, summary, verdict
    bridgepool deploy down                                              # containers, networks, volumes: gone

`up` builds the image (deploy/images.py), starts every service, waits for the `submit` service
(`flwr run --stream`) to exit, then copies the evidence out of the containers into OUT (the run's
run.json from the runs volume; each centre's data manifest and egress ledger from its worker) and
prints the summary and the residency verdict (deploy/audit.py), as `bridgepool demo` does.
Works with Compose v2 (`docker compose`) and v1 (`docker-compose` 1.29, Debian's).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy import commands, compose, images

PROJECT = "bridgepool"
RUN_DIR = "/runs/compose"  # compose.run_config()'s run-dir, inside the superlink's runs volume
OFFLINE_SKIP = ("grafana",)  # its image exists only in a registry


class Compose:
    """One compose project: `compose -p PROJECT -f docker-compose.yml ...` with its environment."""

    def __init__(self, project: str = PROJECT, env: Mapping[str, str] | None = None, docker: str = "docker",
                 compose_file: Path = compose.COMPOSE_FILE) -> None:
        self.project, self.docker, self.file = project, docker, compose_file
        # Compose v1 gives up on a daemon call after 60 s; a loaded host's daemon can take longer.
        self.env = {"COMPOSE_HTTP_TIMEOUT": "600", "DOCKER_CLIENT_TIMEOUT": "600", **os.environ, **(env or {})}
        self.argv = [*compose_command(docker, self.env), "-p", project, "-f", str(compose_file)]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.argv, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(self.argv[-4:])} {' '.join(args)}` failed (exit {done.returncode}):\n"
                               f"{(done.stdout + done.stderr).strip()[-3000:]}")
        return done

    def docker_cmd(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([self.docker, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"`docker {' '.join(args)}` failed (exit {done.returncode}): "
                               f"{(done.stdout + done.stderr).strip()[-2000:]}")
        return done

    def container(self, service: str) -> str:
        """The id of a service's container (Compose v1 and v2 both label theirs)."""
        ids = self.docker_cmd("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}",
                              "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        if len(ids) != 1:
            raise RuntimeError(f"service {service}: expected one container, found {len(ids)}")
        return ids[0]

    def state(self, service: str) -> dict[str, Any]:
        return json.loads(self.docker_cmd("inspect", "--format", "{{json .State}}", self.container(service)).stdout)

    def services(self) -> list[str]:
        return self("config", "--services").stdout.split()

    def read(self, service: str, path: str) -> bytes | None:
        """A file inside a service's container (running or stopped), or None if it is not there."""
        done = subprocess.run([self.docker, "cp", f"{self.container(service)}:{path}", "-"], capture_output=True,
                              env=self.env, timeout=60)
        if done.returncode != 0:
            return None
        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
            member = tar.next()
            f = tar.extractfile(member) if member else None
            return f.read() if f else None


def compose_command(docker: str = "docker", env: Mapping[str, str] | None = None) -> list[str]:
    """`docker compose` (v2) when the plugin is there, else Debian's `docker-compose` (v1)."""
    v2 = subprocess.run([docker, "compose", "version"], capture_output=True, env=dict(env or os.environ))
    if v2.returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("no Docker Compose: install the compose plugin (`docker compose`) or Debian's "
                       "docker-compose (apt-get install docker-compose)")


def run_config_string(overrides: Sequence[str]) -> str:
    """`--set KEY=VALUE` pairs as one `--run-config` string, validated against pyproject's defaults first."""
    from models.config import RunConfig, load_defaults, parse_overrides

    values = parse_overrides(list(overrides))
    RunConfig.from_mapping({**load_defaults(), **compose.run_config(3), **values})  # names a bad key or value
    return " ".join(f"{k}={commands.toml_value(v)}" for k, v in values.items())


def up_env(offline: bool, run_config: str, variables: Mapping[str, int] | None = None) -> dict[str, str]:
    """The compose variables: the run-config pairs, the offline Prometheus image, host ports and the like."""
    env = {"BRIDGEPOOL_RUN_CONFIG": run_config}
    if offline:
        env["PROMETHEUS_IMAGE"] = images.IMAGE  # Debian's prometheus, in the project image
    for name, value in (variables or {}).items():
        env[name] = str(value)
    return env


def start(c: Compose, offline: bool) -> None:
    services = [s for s in c.services() if not (offline and s in OFFLINE_SKIP)]
    c("up", "-d", "--no-build", *services, timeout=900)


def wait_submit(c: Compose, timeout: float) -> int:
    """Block until `flwr run` exits; its exit status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = c.state("submit")
        if state["Status"] == "exited":
            return int(state["ExitCode"])
        time.sleep(2)
    raise TimeoutError(f"the run did not finish within {timeout:.0f}s; follow it with "
                       f"`docker compose -p {c.project} logs -f submit`, stop it with `bridgepool deploy down`")


def collect(c: Compose, out: Path) -> Path:
    """The run's evidence, copied out of the containers into a run directory `bridgepool audit` reads."""
    out.mkdir(parents=True, exist_ok=True)
    run = c.read("superlink", f"{RUN_DIR}/run.json")
    if run is None:
        raise RuntimeError(f"no {RUN_DIR}/run.json in the runs volume; see `docker compose -p {c.project} "
                           "logs superlink submit`")
    (out / "run.json").write_bytes(run)
    for name, _ in compose.centres_and_sources():
        for src, dst in (("/data/corpus/manifest.json", "data/manifest.json"),
                         ("/state/egress-ledger.jsonl", "state/egress-ledger.jsonl")):
            data = c.read(f"worker-{name}", src)
            if data is not None:
                (out / "centres" / name / dst).parent.mkdir(parents=True, exist_ok=True)
                (out / "centres" / name / dst).write_bytes(data)
    return out


def cmd_up(args: Any) -> int:
    from rich.console import Console

    from deploy.audit import summary, write_report
    from deploy.live import summary_table
    from deploy.report import summary_rows

    console = Console()
    run_config = run_config_string(args.set)
    c = Compose(args.project, up_env(args.offline, run_config))
    t0 = time.monotonic()
    if not args.no_build:
        console.print(f"building {images.IMAGE}" + (" offline (debootstrap base, cached wheels)" if args.offline
                                                    else ""))
        images.build(offline=args.offline)
        console.print(f"built in {time.monotonic() - t0:.0f}s")
    start(c, args.offline)
    console.print(f"started project {args.project}; waiting for the run (`docker compose -p {args.project} "
                  "logs -f submit` to follow it)")
    code = wait_submit(c, args.timeout)
    out = collect(c, (args.out or Path("runs") / time.strftime("compose-%Y%m%d-%H%M%S")).resolve())
    run = json.loads((out / "run.json").read_text())
    js, md, report = write_report(out)
    console.print(f"{summary(report)}\nresidency:   {md} (and {js.name})")
    if code != 0 or run.get("status") != "finished":
        raise RuntimeError(f"run failed (flwr run exit {code}): {run.get('message', '')} "
                           f"see `docker compose -p {args.project} logs`")
    console.print(summary_table(summary_rows(run), f"compose run finished in {time.monotonic() - t0:.0f}s"))
    console.print(f"run record: {out / 'run.json'}; the containers keep running until `bridgepool deploy down`")
    return 0 if report["verdict"] == "pass" else 1


def cmd_down(args: Any) -> int:
    c = Compose(args.project, up_env(True, ""))
    c("down", "-v", "--remove-orphans", timeout=300)
    print(f"project {args.project}: containers, networks and volumes removed")
    return 0
