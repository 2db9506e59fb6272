"""Typed run configuration, parsed once from `[tool.flwr.app.config]`.

The defaults live in one place only: the `[tool.flwr.app.config]` table of
pyproject.toml. Flower hands the merged table to the apps as `context.run_config`;
the CLI reads the same table with `load_defaults()`. Both go through
`RunConfig.from_mapping`, which rejects unknown keys and bad values with a
message naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# The repository root doubles as the Flower app directory (`flwr run ROOT`).
APP_DIR = Path(__file__).resolve().parent.parent
# Each model's context length, here (not only in models/gpt.py) so that a 'seq-len' longer than the
# model's context is refused when the config is parsed, not by every centre a round later.
MODEL_BLOCK_SIZES: dict[str, int] = {"tiny": 32, "small": 128, "base": 1024, "large": 1024, "xl": 1024}
MODEL_NAMES = tuple(MODEL_BLOCK_SIZES)
STRATEGIES = ("diloco", "fedavg")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
AGGREGATORS = ("mean", "trimmed-mean", "median")
DATA_PLANES = ("stream", "flower")
WIRE_DTYPES = ("fp32", "bf16")
# A run-name becomes a directory under each centre's state directory: one path component only,
# never "." or ".." (issue 19, threat 4: "../../de-lrz/state/victim" wrote into another centre).
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ConfigError(ValueError):
    """A run-config key is unknown or its value is invalid."""


@dataclass(frozen=True)
class RunConfig:
    model: str
    rounds: int
    inner_steps: int
    batch_size: int
    seq_len: int  # 0 = the model's block size
    inner_lr: float
    inner_warmup_steps: int
    inner_weight_decay: float
    overlap_steps: int  # inner steps trained ahead on the centre's own model while the server aggregates
    round_seconds: float  # time budget: each centre trains until its round's compute reaches this; 0 = fixed H
    min_inner_steps: int  # with a time budget: the fewest inner steps a centre takes per round
    max_inner_steps: int  # with a time budget: the most (also caps the tokens a reply may claim)
    strategy: str
    compression: str  # none | int8: how the model and the updates travel (server/broadcast.py)
    outer_lr: float
    outer_momentum: float
    eval_batches: int
    device: str
    precision: str
    threads: int
    seed: int
    min_centres: int
    expected_centres: int
    connect_timeout: float
    round_timeout: float
    run_dir: str
    run_name: str
    resume: bool
    checkpoint_every: int  # rounds between checkpoints; the last round is always one
    checkpoint_keep: int  # newest checkpoints kept (coordinator's and centres' inner state); 0 = all
    metrics_port: int  # the ServerApp's Prometheus endpoint; 0 = off
    max_norm_factor: float  # reject pseudo-gradients above this x the round's median norm; 0 = off
    aggregator: str  # how accepted pseudo-gradients are combined (AGGREGATORS)
    dp_clip: float  # DP: clip each centre's pseudo-gradient to this L2 norm; 0 = DP off
    dp_noise_multiplier: float  # DP: Gaussian noise std on the sum = this x dp-clip
    dp_delta: float  # DP: the delta epsilon is reported at
    data_plane: str  # stream | flower: where the weights travel (server/dataplane.py)
    wire_dtype: str  # fp32 | bf16: a centre's new weights on the data plane
    data_plane_host: str  # the data plane's bind address
    data_plane_port: int  # 0 = any free port
    data_plane_advertise: str  # the host centres dial; "" = data_plane_host
    data_plane_certfile: str  # TLS certificate; "" = plaintext
    data_plane_keyfile: str
    centre_keys: str  # directory of NAME.pub: each centre's name pinned to its registered key; "" = off

    def __post_init__(self) -> None:
        _choice("model", self.model, MODEL_NAMES)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("compression", self.compression, ("none", "int8"))
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("aggregator", self.aggregator, AGGREGATORS)
        check_run_name(self.run_name)
        for key in ("rounds", "inner-steps", "batch-size", "eval-batches", "expected-centres", "checkpoint-every"):
            _at_least(key, getattr(self, _snake(key)), 1)
        for key in ("seq-len", "inner-warmup-steps", "threads", "min-centres", "seed", "metrics-port",
                    "overlap-steps", "checkpoint-keep"):
            _at_least(key, getattr(self, _snake(key)), 0)
        self._check_budget()
        for key in ("inner-lr", "outer-lr", "connect-timeout", "round-timeout"):
            if not getattr(self, _snake(key)) > 0:
                raise ConfigError(
                    f"config key '{key}' must be > 0, got {getattr(self, _snake(key))}"
                )
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(
                f"config key 'outer-momentum' must be in [0, 1), got {self.outer_momentum}"
            )
        if self.max_norm_factor != 0 and not self.max_norm_factor > 1:  # "not >" also refuses NaN
            raise ConfigError(
                f"config key 'max-norm-factor' must be 0 (off) or > 1, got {self.max_norm_factor}"
            )
        if self.seq_len > MODEL_BLOCK_SIZES[self.model]:
            raise ConfigError(f"config key 'seq-len' ({self.seq_len}) exceeds model {self.model!r}'s context of "
                              f"{MODEL_BLOCK_SIZES[self.model]} tokens; lower it (0 = the model's context)")
        if self.overlap_steps > self.inner_steps:
            raise ConfigError(f"config key 'overlap-steps' ({self.overlap_steps}) exceeds 'inner-steps' "
                              f"({self.inner_steps}): at most a whole round can be trained ahead")
        if not self.inner_weight_decay >= 0:  # "not >=" also refuses NaN, which torch's AdamW refuses later
            raise ConfigError(f"config key 'inner-weight-decay' must be >= 0, got {self.inner_weight_decay}")
        # Values torch's optimisers would take and turn into NaN weights a round later, or refuse
        # inside the federation: refused here, before anything starts.
        for key in ("inner-lr", "outer-lr", "inner-weight-decay", "outer-momentum", "dp-clip",
                    "dp-noise-multiplier"):
            if not math.isfinite(getattr(self, _snake(key))):
                raise ConfigError(f"config key '{key}' must be a finite number, got {getattr(self, _snake(key))}")
        if self.metrics_port > 65535:
            raise ConfigError(f"config key 'metrics-port' must be a TCP port (1-65535, 0 = off), "
                              f"got {self.metrics_port}")
        self._check_dp()
        self._check_data_plane()
        if self.min_centres > self.expected_centres:
            raise ConfigError(
                f"config key 'min-centres' ({self.min_centres}) exceeds 'expected-centres' "
                f"({self.expected_centres}); lower the quorum or start more centres"
            )

    def _check_budget(self) -> None:
        if not (math.isfinite(self.round_seconds) and self.round_seconds >= 0):  # "not >=" also refuses NaN
            raise ConfigError(f"config key 'round-seconds' must be >= 0 (0 = off, fixed inner-steps), "
                              f"got {self.round_seconds}")
        _at_least("min-inner-steps", self.min_inner_steps, 1)
        if self.max_inner_steps < self.min_inner_steps:
            raise ConfigError(f"config key 'max-inner-steps' ({self.max_inner_steps}) is below 'min-inner-steps' "
                              f"({self.min_inner_steps})")
        if self.round_seconds > 0 and self.overlap_steps > 0:
            # Steps trained ahead are a fixed count started before the round's clock; under a time budget
            # the count would depend on how long the server took to aggregate, and resume would not replay it.
            raise ConfigError("config keys 'round-seconds' and 'overlap-steps' cannot both be set: a time budget "
                              "already keeps every centre busy; set overlap-steps = 0 or round-seconds = 0")

    def checkpointed(self, rnd: int) -> bool:
        """Whether round `rnd` ends with a checkpoint: every `checkpoint-every` rounds, and the last. The
        centres keep their inner-optimiser state for these rounds only: resume starts from one of them."""
        return rnd % self.checkpoint_every == 0 or rnd == self.rounds

    @property
    def budgeted(self) -> bool:
        """Rounds end on a time budget (round-seconds > 0), not after a fixed inner-steps."""
        return self.round_seconds > 0

    @property
    def max_steps_per_round(self) -> int:
        """The most inner steps one centre can take in a round: the token cap's factor."""
        return self.max_inner_steps if self.budgeted else self.inner_steps

    def _check_dp(self) -> None:
        for key in ("dp-clip", "dp-noise-multiplier"):
            if not getattr(self, _snake(key)) >= 0:  # "not >=" also refuses NaN
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, _snake(key))}")
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError(f"config key 'dp-delta' must be in (0, 1), got {self.dp_delta}")
        if self.dp_noise_multiplier > 0 and self.dp_clip == 0:
            raise ConfigError("config key 'dp-noise-multiplier' needs 'dp-clip' > 0: "
                              "noise is calibrated to the clipping norm")
        if self.dp_clip > 0 and self.aggregator != "mean":
            raise ConfigError(f"config key 'dp-clip' > 0 needs aggregator = \"mean\" (got {self.aggregator!r}): "
                              "the privacy accounting assumes the plain mean of clipped updates")

    def _check_data_plane(self) -> None:
        _choice("data-plane", self.data_plane, DATA_PLANES)
        _choice("wire-dtype", self.wire_dtype, WIRE_DTYPES)
        if not 0 <= self.data_plane_port <= 65535:
            raise ConfigError(f"config key 'data-plane-port' must be in 0..65535, got {self.data_plane_port}")
        if self.wire_dtype != "fp32" and self.data_plane != "stream":
            raise ConfigError(f"config key 'wire-dtype' = {self.wire_dtype!r} needs data-plane = \"stream\"")
        if self.wire_dtype != "fp32" and self.compression == "int8":
            raise ConfigError("config keys 'wire-dtype' and 'compression' = \"int8\" both set how updates travel; "
                              "keep wire-dtype = \"fp32\" with int8")
        if self.data_plane == "stream" and self.data_plane_host in ("0.0.0.0", "::") and not self.data_plane_advertise:
            raise ConfigError(f"config key 'data-plane-host' = {self.data_plane_host!r} binds every address: "
                              "set 'data-plane-advertise' to the host the centres dial")
        if bool(self.data_plane_certfile) != bool(self.data_plane_keyfile):
            raise ConfigError("config keys 'data-plane-certfile' and 'data-plane-keyfile' go together")

    @property
    def data_plane_url(self) -> str:
        """What the centres are told to dial (the port is filled in once the server has bound it)."""
        scheme = "https" if self.data_plane_certfile else "http"
        return f"{scheme}://{self.data_plane_advertise or self.data_plane_host}"

    @property
    def quorum(self) -> int:
        """Replies needed to close a round (0 in the config means every centre)."""
        return self.min_centres or self.expected_centres

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (as in pyproject / `context.run_config`)."""
        known = {_kebab(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        missing = sorted(set(known) - set(values))
        if missing:
            raise ConfigError(f"missing config key(s) {', '.join(missing)} (see pyproject.toml)")
        kwargs = {f.name: _coerce(key, values[key], f.type) for key, f in known.items()}
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case dict, the inverse of `from_mapping` (stored in checkpoints)."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def check_run_name(name: str) -> str:
    """`name` if it is a safe run-name (RUN_NAME_PATTERN, not '.' or '..'), else ConfigError."""
    if not isinstance(name, str) or not RUN_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"config key 'run-name' must be 1-64 characters of A-Z a-z 0-9 . _ - and not "
                          f"'.' or '..' (it names a directory on every centre), got {name!r}")
    return name


def load_defaults(app_dir: Path = APP_DIR) -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table of the app's pyproject.toml."""
    path = app_dir / "pyproject.toml"
    with path.open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (TOML values, as `flwr run --run-config` takes them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r} is not key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()  # a bare word is a string
    return out


def _coerce(key: str, value: Any, type_name: str) -> Any:
    want = {"int": int, "float": float, "str": str, "bool": bool}[str(type_name)]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {want.__name__}, got {value!r}")
    return value


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}, got {value}")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(key: str) -> str:
    return key.replace("-", "_")
