"""Typed run config: one source of defaults, errors that name the key."""

import pytest

from models.config import ConfigError, RunConfig, load_defaults, parse_overrides


def test_defaults_parse():
    cfg = RunConfig.from_mapping(load_defaults())
    assert cfg.strategy == "diloco" and cfg.rounds >= 1
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize("key,value,needle", [
    ("model", "huge", "'model' must be one of tiny, small, base"),
    ("rounds", 0, "'rounds' must be >= 1"),
    ("inner-lr", -1.0, "'inner-lr' must be > 0"),
    ("strategy", "fedprox", "'strategy'"),
    ("rounds", "3", "'rounds' must be int"),
    ("aggregator", "krum", "'aggregator' must be one of mean, trimmed-mean, median"),
    ("max-norm-factor", 0.5, "'max-norm-factor' must be 0 \\(off\\) or > 1"),
    ("max-norm-factor", float("nan"), "'max-norm-factor'"),
    # Values torch would refuse (or turn into NaN weights) once the federation runs (issue 18).
    ("inner-weight-decay", float("nan"), "'inner-weight-decay' must be >= 0"),
    ("inner-lr", float("inf"), "'inner-lr' must be a finite number"),
    ("outer-lr", float("inf"), "'outer-lr' must be a finite number"),
    ("outer-momentum", float("nan"), "'outer-momentum' must be in"),
    ("dp-clip", float("inf"), "'dp-clip' must be a finite number"),
    ("metrics-port", 70000, "'metrics-port' must be a TCP port"),
    ("checkpoint-every", 0, "'checkpoint-every' must be >= 1"),
    ("checkpoint-keep", -1, "'checkpoint-keep' must be >= 0"),
])
def test_invalid_values_name_the_key(key, value, needle):
    values = {**load_defaults(), key: value}
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_mapping(values)


def test_seq_len_beyond_the_models_context_is_refused_up_front():
    from models.gpt import MODEL_SIZES
    assert {n: c.block_size for n, c in MODEL_SIZES.items()} == {"tiny": 32, "small": 128, "base": 1024,
                                                                    "large": 1024, "xl": 1024}
    with pytest.raises(ConfigError, match="'seq-len' \\(64\\) exceeds model 'tiny'.s context of 32"):
        RunConfig.from_mapping({**load_defaults(), "model": "tiny", "seq-len": 64})
    assert RunConfig.from_mapping({**load_defaults(), "model": "tiny", "seq-len": 32}).seq_len == 32


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key.*inner-stpes"):
        RunConfig.from_mapping({**load_defaults(), "inner-stpes": 3})


def test_overrides_are_toml_values():
    assert parse_overrides(["rounds=3", "inner-lr=1e-3", "model=tiny", 'device="cpu"']) == {
        "rounds": 3, "inner-lr": 1e-3, "model": "tiny", "device": "cpu"}
    with pytest.raises(ConfigError):
        parse_overrides(["rounds"])


def test_zero_outer_momentum_is_valid():
    """Plain outer SGD (with outer-lr = 1: FedAvg); server/aggregation.py uses Nesterov only when > 0."""
    assert RunConfig.from_mapping({**load_defaults(), "outer-momentum": 0.0}).outer_momentum == 0.0
