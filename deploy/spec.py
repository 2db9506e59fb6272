"""A federation described in one file: `bridgepool run FEDERATION.toml`.

The same file drives every deployment: `bridgepool run` (the deployment it names),
`bridgepool deploy netns --spec F` and `bridgepool deploy compose --spec F`.
`bridgepool demo` is a run of the built-in spec, deploy/specs/demo.toml.

    [federation]
    name = "my-consortium"    # names the run (runs/NAME-DATE) ; [a-z0-9-]
    deployment = "local"      # local | netns | compose

    [coordinator]             # all optional
    base-port = 9200          # SuperLink; the SuperNodes use the next ports (one per centre)
    metrics-port = 9300       # the server's Prometheus endpoint; centres use the next ports (0 = off)
    prometheus-port = 0       # also run Debian's prometheus on this port (0 = don't)
    keep-metrics = false      # keep Prometheus and the endpoints up after the run, until Ctrl-C

    [config]                  # any [tool.flwr.app.config] key of pyproject.toml; the rest keep its defaults
    model = "tiny"

    [[centre]]                # one table per centre
    name = "hospital-a"       # [a-z0-9-], unique
    source = "corpora/a"      # a path (txt, md, jsonl, json, parquet; relative to this file),
                              # hf:NAME[:CONFIG] (from the local Hugging Face cache) or manpages:LANG
    max-bytes = 0             # text prepared for this centre (0 = all)
    device = "auto"           # auto | cpu | cuda for this centre's worker (default: [config] device)
    threads = 0               # torch threads of this centre's worker (0 = [config] threads)
    nproc = 1                 # data-parallel ranks of this centre (torchrun; its threads are shared among them)
    shard = false             # split the model over those ranks (FSDP) instead of a whole copy each (nproc >= 2)
    speed = 1.0               # < 1 emulates a slower centre on this machine: 0.333 = each step takes 3x as long
                              # (study unequal centres, e.g. with [config] round-seconds; 1 = full speed)
    undecodable = "stop"      # a .txt/.md that is not UTF-8: stop with its name, or skip it (counted)

Everything is checked by `load_spec` before anything starts; an error names the file, the
key and what is allowed (SpecError, which the CLI prints as `bridgepool: error: ...`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from models.config import DEVICES, ConfigError, RunConfig, load_defaults

BUILTIN_DEMO = Path(__file__).with_name("specs") / "demo.toml"
DEPLOYMENTS = ("local", "netns", "compose")
MAX_NPROC = 256  # ranks of one centre on one node
UNDECODABLE = ("stop", "skip")  # as clients/sources.py; not imported: that would load the data stack
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")  # a directory, a namespace and a compose service name
# Run-config keys the launcher sets, and where the spec says them instead.
SET_BY_LAUNCHER = {"expected-centres": "the number of [[centre]] tables",
                   "run-dir": "--run-dir", "run-name": "[federation] name", "resume": "--resume",
                   "metrics-port": "[coordinator] metrics-port"}


class SpecError(ValueError):
    """The spec file is invalid; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class CentreSpec:
    name: str
    source: str  # an absolute path, hf:NAME[:CONFIG] or manpages:LANG
    max_bytes: int = 0  # 0 = all
    device: str = ""  # "" = the run config's device
    threads: int = 0  # 0 = the run config's threads
    speed: float = 1.0  # < 1: an emulated slower centre (clients/training.py)
    undecodable: str = "stop"
    nproc: int = 1  # data-parallel ranks of the centre's worker (clients/ranks.py)
    shard: bool = False  # its model split over those ranks (FSDP, clients/shard.py); needs nproc >= 2


@dataclass(frozen=True)
class CoordinatorSpec:
    base_port: int = 9200
    metrics_port: int = 9300
    prometheus_port: int = 0
    keep_metrics: bool = False


@dataclass(frozen=True)
class FederationSpec:
    path: Path
    name: str
    deployment: str
    coordinator: CoordinatorSpec
    config: dict[str, Any]  # the [config] table: run-config keys over pyproject's defaults
    centres: tuple[CentreSpec, ...]

    def run_config(self, run_dir: Path, overrides: Mapping[str, Any] | None = None,
                   saved: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults, then a resumed run's saved config, [config], then `overrides` (CLI flags)."""
        values = {**load_defaults(), **(saved or {}), **self.config, **(overrides or {})}
        values.update({"expected-centres": len(self.centres), "run-dir": str(Path(run_dir).resolve()),
                       "run-name": Path(run_dir).name, "resume": saved is not None})
        try:
            return RunConfig.from_mapping(values)
        except ConfigError as err:
            if overrides or saved:  # the spec alone passed load_spec: the flags (or the resumed run) made this
                where = "the command line's --set and flags" + (" and the resumed run's config" if saved else "")
                raise ConfigError(f"{err} (from {where}, over {self.path})") from None
            raise SpecError(f"{self.path}: [config]: {err}") from None

    def with_centres(self, n: int) -> FederationSpec:
        """The first `n` centres (`bridgepool demo --centres N`)."""
        if not 1 <= n <= len(self.centres):
            raise SpecError(f"--centres must be between 1 and {len(self.centres)} (the centres of {self.path}: "
                            f"{', '.join(c.name for c in self.centres)})")
        return replace(self, centres=self.centres[:n])

    def with_nproc(self, n: int) -> FederationSpec:
        """Every centre with `n` ranks (`--nproc-per-centre N`)."""
        if not 1 <= n <= MAX_NPROC:
            raise SpecError(f"--nproc-per-centre must be between 1 and {MAX_NPROC}, got {n}")
        return replace(self, centres=tuple(replace(c, nproc=n) for c in self.centres))

    def with_shard(self) -> FederationSpec:
        """Every centre's model split over its ranks (`--shard`, with `--nproc-per-centre` 2 or more)."""
        single = [c.name for c in self.centres if c.nproc < 2]
        if single:
            raise SpecError(f"--shard splits each centre's model over its ranks, but {', '.join(single)} "
                            "run(s) 1 rank; add --nproc-per-centre 2 (or more), or leave --shard out")
        return replace(self, centres=tuple(replace(c, shard=True) for c in self.centres))

    def shards(self) -> set[str]:
        """The centres whose model is split over their ranks, as deploy/compose.py takes them."""
        return {c.name for c in self.centres if c.shard}

    def nprocs(self) -> dict[str, int]:
        """Ranks per centre name, as deploy/compose.py takes them."""
        return {c.name: c.nproc for c in self.centres}

    def with_slow_last_centre(self, speed: float) -> FederationSpec:
        """The last centre emulated at `speed` (`bridgepool demo --round-seconds`)."""
        return replace(self, centres=(*self.centres[:-1], replace(self.centres[-1], speed=speed)))

    def sources(self) -> list[tuple[str, str]]:
        """(name, source) per centre, as deploy/compose.py takes them."""
        return [(c.name, c.source) for c in self.centres]


def load_spec(path: Path) -> FederationSpec:
    """Parse and check a spec file (see the module docstring); SpecError on any problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; pass a federation spec (see examples/)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from None
    where = _Where(path)
    where.keys("", data, {"federation", "coordinator", "config", "centre"})
    fed = where.table("federation", data.get("federation", {}))
    where.keys("[federation]", fed, {"name", "deployment"})
    name = where.name("[federation] name", fed.get("name", path.stem))
    deployment = where.choice("[federation] deployment", fed.get("deployment", "local"), DEPLOYMENTS)
    coordinator = _coordinator(where, where.table("coordinator", data.get("coordinator", {})))
    config = dict(where.table("config", data.get("config", {})))
    for key, instead in SET_BY_LAUNCHER.items():
        if key in config:
            raise SpecError(f"{path}: [config] key '{key}' is set by the launcher; use {instead}")
    raw = data.get("centre", [])
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{path}: no [[centre]] tables; describe at least one centre (name, source)")
    centres = tuple(_centre(where, i, where.table(f"centre[{i}]", c), path.parent) for i, c in enumerate(raw))
    seen: set[str] = set()
    for c in centres:
        if c.name in seen:
            raise SpecError(f"{path}: centre name '{c.name}' is used twice; each centre needs its own name")
        seen.add(c.name)
    spec = FederationSpec(path, name, deployment, coordinator, config, centres)
    spec.run_config(Path("runs") / name)  # every run-config value checked now, not in the federation
    return spec


def _coordinator(where: _Where, table: dict[str, Any]) -> CoordinatorSpec:
    where.keys("[coordinator]", table, {"base-port", "metrics-port", "prometheus-port", "keep-metrics"})
    d = CoordinatorSpec()
    c = CoordinatorSpec(
        base_port=where.integer("[coordinator] base-port", table.get("base-port", d.base_port), 1, 65535),
        metrics_port=where.integer("[coordinator] metrics-port", table.get("metrics-port", d.metrics_port), 0, 65535),
        prometheus_port=where.integer("[coordinator] prometheus-port", table.get("prometheus-port", d.prometheus_port),
                                      0, 65535),
        keep_metrics=where.boolean("[coordinator] keep-metrics", table.get("keep-metrics", d.keep_metrics)))
    if c.keep_metrics and not c.metrics_port:
        raise SpecError(f"{where.path}: [coordinator] keep-metrics = true needs metrics-port > 0")
    return c


def _centre(where: _Where, i: int, table: dict[str, Any], root: Path) -> CentreSpec:
    at = f"centre[{i}]"  # 0-based, in file order
    where.keys(at, table, {"name", "source", "max-bytes", "device", "threads", "speed", "undecodable", "nproc",
                            "shard"})
    for key in ("name", "source"):
        if key not in table:
            raise SpecError(f"{where.path}: {at} has no '{key}'; every centre needs a name and a source")
    name = where.name(f"{at} name", table["name"])
    at = f"centre '{name}'"
    source = where.string(f"{at} source", table["source"])
    if source.startswith("hf:"):
        if not source[3:].split(":")[0]:
            raise SpecError(f"{where.path}: {at} source {source!r}: hf: needs a dataset name, hf:NAME[:CONFIG]")
    elif source.startswith("manpages:"):
        lang = source.split(":", 1)[1]
        if not re.fullmatch(r"[a-z]{2}(_[A-Z]{2})?", lang):
            raise SpecError(f"{where.path}: {at} source {source!r}: manpages: needs a language such as fr, de, en")
        from clients.sources import DataSourceError, manpage_paths

        try:
            manpage_paths(lang)  # installed? (the error says which package)
        except DataSourceError as err:
            raise SpecError(f"{where.path}: {at} {err}") from None
    else:
        local = (root / source).expanduser().resolve()
        if not local.exists():
            raise SpecError(f"{where.path}: {at} source '{source}': no such file or directory ({local}); "
                            "allowed: a path (txt, md, jsonl, json, parquet; relative to the spec), "
                            "hf:NAME[:CONFIG] or manpages:LANG")
        source = str(local)
    nproc = where.integer(f"{at} nproc", table.get("nproc", 1), 1, MAX_NPROC)
    shard = where.boolean(f"{at} shard", table.get("shard", False))
    if shard and nproc < 2:
        raise SpecError(f"{where.path}: {at} shard = true splits the model over the centre's ranks and needs "
                        f"nproc >= 2 (it has {nproc}); set nproc = 2 or more, or shard = false")
    return CentreSpec(
        name=name, source=source,
        max_bytes=where.integer(f"{at} max-bytes", table.get("max-bytes", 0), 0, None),
        device=where.choice(f"{at} device", table["device"], DEVICES) if "device" in table else "",
        threads=where.integer(f"{at} threads", table.get("threads", 0), 0, 1024),
        nproc=nproc, shard=shard,
        speed=where.speed(f"{at} speed", table.get("speed", 1.0)),
        undecodable=where.choice(f"{at} undecodable", table.get("undecodable", "stop"), UNDECODABLE))


class _Where:
    """Checks that name the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, want: str, got: Any) -> SpecError:
        return SpecError(f"{self.path}: {key} must be {want}; got {got!r}")

    def keys(self, at: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            what = f"{at} key(s)" if at else "table(s)"
            raise SpecError(f"{self.path}: unknown {what} {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")

    def table(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "a table", value)
        return value

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string", value)
        return value

    def name(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not NAME.fullmatch(value):
            raise self.fail(key, "1-31 characters of a-z, 0-9 and '-', starting with a letter or digit", value)
        return value

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(key, f"one of {', '.join(allowed)}", value)
        return str(value)

    def integer(self, key: str, value: Any, low: int, high: int | None) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            raise self.fail(key, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""), value)
        return value

    def speed(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise self.fail(key, "a number in (0, 1] (1 = full speed, 0.333 = 3x slower)", value)
        return float(value)

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value
