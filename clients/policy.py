"""The centre operator's policy: what a run may ask of this centre's worker (pure; no Flower).

Whoever holds the worker's socket (in Flower's model: whoever submitted the ClientApp)
picks both the run config and the weights. Without limits the worker is an oracle: with
`batch-size=1 seq-len=1 eval-batches=1` its eval-loss is a function of a few known bytes
of the centre's data under weights the requester chose, and repeated requests read the
corpus out (issue 19, threat 2). The policy is set by the centre, on its own command line
(`bridgepool centre serve --policy FILE`, TOML or YAML), never by the run:

    min-train-tokens = 65536          # batch-size x seq-len x inner-steps of one train request
    min-eval-tokens = 8192            # eval-batches x batch-size x seq-len of one evaluation
    inner-lr = [1e-5, 1e-2]           # inclusive bounds
    inner-weight-decay = [0.0, 0.5]
    max-requests-per-run = 200        # train + evaluate requests one run-name may make
    max-requests-total = 5000         # ... all runs together since the worker started (0 = no limit):
                                      # a new run-name per request would otherwise reset the budget
    models = ["small", "base"]
    allowed-keys = [...]              # run-config keys a request may carry (default: any RunConfig key)
    update-clip = 1.0                 # L2 clip of the update (pseudo-gradient) before it leaves; 0 = off
    update-noise-multiplier = 0.5     # Gaussian noise std = this x update-clip on it; 0 = none
    max-message-bytes = 700000000     # the worker socket's per-frame limit (default: largest model + margin)
    read-timeout = 60.0               # seconds a client has to deliver its request
    [allowed-values]
    compression = ["none", "int8"]    # a key listed here may only take these values

Clip + noise is per-centre local differential privacy on what leaves this centre: the
pseudo-gradient d = sent - trained is scaled to norm <= C and N(0, (z C)^2) is added per
value, so the coordinator and the other centres only ever see sent - (clip(d) + noise).
It is independent of the server's own `dp-clip` (central DP, which trusts the server).

Refused requests are recorded in the egress ledger (verdict "refused", stage "policy") and
named in the worker's error reply. The defaults below refuse the 1-token oracle and nothing
the project's own runs need; an operator with real data should raise the minimums.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.config import MODEL_NAMES, ConfigError, RunConfig
from models.gpt import model_config

MARGIN_BYTES = 64 << 20  # headers and a second array (the int8 scales) beside the largest model
GATED_OPS = ("prepare", "train", "evaluate", "egress-check")  # ops that carry a run config
BUDGETED_OPS = ("train", "evaluate")  # ops that read the centre's data


class PolicyError(ValueError):
    """The policy file itself is invalid (an unknown key, a bad bound)."""


class PolicyRefused(RuntimeError):
    """A request breaks the centre's policy; the message names each rule it breaks."""

    def __init__(self, reasons: list[str]):
        super().__init__("refused by the centre's policy: " + "; ".join(reasons))
        self.reasons = reasons


@functools.cache
def largest_model_bytes() -> int:
    """Bytes of the largest registered model as one flat fp32 vector (every state_dict entry,
    tied ones twice, as models/packing.py sends it), computed from the shapes alone."""
    import torch

    from models.gpt import GPT

    biggest = 0
    for name in MODEL_NAMES:
        with torch.device("meta"):  # shapes without memory or initialisation cost
            model = GPT(model_config(name))
        biggest = max(biggest, sum(t.numel() for t in model.state_dict().values()))
    return 4 * biggest


@dataclass(frozen=True)
class Policy:
    min_train_tokens: int = 32  # the tiny model's one-sequence round; refuses seq-len=1 oracles
    min_eval_tokens: int = 32
    inner_lr: tuple[float, float] = (1e-6, 0.1)
    inner_weight_decay: tuple[float, float] = (0.0, 1.0)
    max_requests_per_run: int = 1000
    max_requests_total: int = 0  # 0 = no limit across runs
    models: tuple[str, ...] = MODEL_NAMES
    allowed_keys: tuple[str, ...] = ()  # () = any key RunConfig knows
    allowed_values: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    update_clip: float = 0.0
    update_noise_multiplier: float = 0.0
    max_message_bytes: int = 0  # 0 = largest_model_bytes() + MARGIN_BYTES
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        for key in ("min-train-tokens", "min-eval-tokens", "max-requests-per-run", "max-requests-total",
                    "max-message-bytes"):
            if not isinstance(getattr(self, _snake(key)), int) or getattr(self, _snake(key)) < 0:
                raise PolicyError(f"policy key '{key}' must be an integer >= 0, got {getattr(self, _snake(key))!r}")
        for key in ("inner-lr", "inner-weight-decay"):
            low, high = getattr(self, _snake(key))
            if not 0 <= low <= high:
                raise PolicyError(f"policy key '{key}' must be [low, high] with 0 <= low <= high, got {[low, high]}")
        for key in ("update-clip", "update-noise-multiplier", "read-timeout"):
            if not getattr(self, _snake(key)) >= 0:  # "not >=" also refuses NaN
                raise PolicyError(f"policy key '{key}' must be >= 0, got {getattr(self, _snake(key))}")
        if self.update_noise_multiplier > 0 and self.update_clip == 0:
            raise PolicyError("policy key 'update-noise-multiplier' needs 'update-clip' > 0: noise std is "
                              "the multiplier x the clip")
        if not self.read_timeout > 0:
            raise PolicyError("policy key 'read-timeout' must be > 0 seconds")
        known = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
        for key in [*self.allowed_keys, *self.allowed_values]:
            if key not in known:
                raise PolicyError(f"policy names run-config key {key!r}, which does not exist; "
                                  f"valid keys: {', '.join(sorted(known))}")
        for m in self.models:
            if m not in MODEL_NAMES:
                raise PolicyError(f"policy key 'models' names {m!r}; choose from {', '.join(MODEL_NAMES)}")

    @property
    def message_limit(self) -> int:
        """The most bytes one frame on the worker socket may have."""
        return self.max_message_bytes or largest_model_bytes() + MARGIN_BYTES

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Policy:
        known = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PolicyError(f"unknown policy key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = known[key]
            if key in ("inner-lr", "inner-weight-decay"):
                if not isinstance(value, list | tuple) or len(value) != 2:
                    raise PolicyError(f"policy key '{key}' must be a list [low, high], got {value!r}")
                value = (float(value[0]), float(value[1]))
            elif key in ("models", "allowed-keys"):
                value = tuple(str(v) for v in value)
            elif key == "allowed-values":
                value = {str(k): tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in dict(value).items()}
            elif key in ("update-clip", "update-noise-multiplier", "read-timeout"):
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """A TOML (.toml) or YAML (.yaml/.yml) policy file; errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError(f"policy file {path} not found; pass --policy with an existing file") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = tomllib.loads(text)
        except Exception as err:  # a parse error of either format
            raise PolicyError(f"policy file {path} does not parse: {err}") from None
        if not isinstance(values, dict):
            raise PolicyError(f"policy file {path} must hold a table of keys")
        try:
            return cls.from_mapping(values)
        except (PolicyError, TypeError, ValueError) as err:
            raise PolicyError(f"policy file {path}: {err}") from None

    # ------------------------------------------------------------ checks
    def violations(self, op: str, run_config: Mapping[str, Any]) -> list[str]:
        """Every rule a request `op` with `run_config` breaks (empty: allowed)."""
        if self.allowed_keys:
            extra = sorted(set(run_config) - set(self.allowed_keys))
            if extra:
                return [f"run-config keys {', '.join(k[:64] for k in extra[:5])} are not allowed here"]
        try:
            cfg = RunConfig.from_mapping(run_config)
        except ConfigError as err:
            return [f"invalid run config: {err}"]
        out: list[str] = []
        if cfg.model not in self.models:
            out.append(f"model {cfg.model!r} is not allowed here (allowed: {', '.join(self.models)})")
        for key, allowed in self.allowed_values.items():
            if run_config[key] not in allowed:
                out.append(f"run-config key '{key}' = {run_config[key]!r} is not allowed here "
                           f"(allowed: {', '.join(map(repr, allowed))})")
        seq = cfg.seq_len or model_config(cfg.model).block_size
        train, evaluate = cfg.batch_size * seq * cfg.inner_steps, cfg.eval_batches * cfg.batch_size * seq
        if train < self.min_train_tokens:
            out.append(f"a train request covers {train} tokens (batch-size x seq-len x inner-steps), below the "
                       f"centre's minimum of {self.min_train_tokens}")
        if evaluate < self.min_eval_tokens:
            out.append(f"an evaluation covers {evaluate} tokens (eval-batches x batch-size x seq-len), below the "
                       f"centre's minimum of {self.min_eval_tokens}")
        for key, (low, high) in (("inner-lr", self.inner_lr), ("inner-weight-decay", self.inner_weight_decay)):
            value = getattr(cfg, _snake(key))
            if not low <= value <= high:
                out.append(f"run-config key '{key}' = {value:g} is outside the centre's bounds [{low:g}, {high:g}]")
        return out

    def privatise(self, sent: np.ndarray, trained: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The weights to send instead of `trained`: sent - (clip(sent - trained) + noise), with
        the pseudo-gradient's L2 norm clipped to update-clip and N(0, (multiplier x clip)^2) added
        per value. `trained` unchanged when update-clip is 0."""
        if self.update_clip <= 0:
            return trained
        delta = np.asarray(sent, np.float64) - np.asarray(trained, np.float64)
        norm = float(np.linalg.norm(delta))
        if norm > self.update_clip:
            delta *= self.update_clip / norm
        if self.update_noise_multiplier > 0:
            rng = rng or np.random.default_rng()  # OS entropy: the noise must not be predictable
            delta += rng.normal(0.0, self.update_noise_multiplier * self.update_clip, delta.shape)
        return (np.asarray(sent, np.float64) - delta).astype(np.float32)


class Gate:
    """A worker's policy in force: checks each request and counts each run's budget."""

    def __init__(self, policy: Policy, on_refused: Callable[..., None] | None = None):
        self.policy = policy
        self.on_refused = on_refused  # e.g. EgressGuard.refused: the ledger entry
        self.requests: dict[str, int] = {}  # run-name -> train + evaluate requests admitted

    def admit(self, header: Mapping[str, Any]) -> None:
        """Raise PolicyRefused (after recording it) unless the request may go ahead."""
        op = str(header.get("op"))
        if op not in GATED_OPS:
            return
        run_config = header.get("run-config")
        if not isinstance(run_config, Mapping):
            self._refuse(op, header, "?", ["the request carries no run config"])
        run = str(run_config.get("run-name", "?"))[:64]
        reasons = self.policy.violations(op, run_config)
        used = self.requests.get(run, 0)
        if op in BUDGETED_OPS and used >= self.policy.max_requests_per_run:
            reasons.append(f"run {run!r} has used its budget of {self.policy.max_requests_per_run} train and "
                           "evaluate requests at this centre")
        total = self.policy.max_requests_total
        if op in BUDGETED_OPS and total and sum(self.requests.values()) >= total:
            reasons.append(f"this centre's budget of {total} train and evaluate requests (all runs) is used up")
        if reasons:
            self._refuse(op, header, run, reasons)
        if op in BUDGETED_OPS:
            self.requests[run] = used + 1

    def _refuse(self, op: str, header: Mapping[str, Any], run: str, reasons: list[str]) -> None:
        rnd = header.get("round", 0)
        if self.on_refused is not None:
            self.on_refused(run=run, round=int(rnd) if isinstance(rnd, int | float) and math.isfinite(rnd) else 0,
                            op=op, reasons=reasons)
        raise PolicyRefused(reasons)


def _snake(key: str) -> str:
    return key.replace("-", "_")
