"""The federation spec (deploy/spec.py): one file, validated before anything starts, errors
naming the file, the key and what is allowed; the same file for run, netns and compose."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clients.data import DEFAULT_CENTRES
from deploy.cli import main
from deploy.spec import BUILTIN_DEMO, SpecError, load_spec
from models.config import APP_DIR

GOOD = """
[federation]
name = "two-sites"
deployment = "local"

[coordinator]
base-port = 9400
metrics-port = 0

[config]
model = "tiny"
rounds = 2

[[centre]]
name = "site-a"
source = "a.jsonl"
device = "cpu"
threads = 2

[[centre]]
name = "site-b"
source = "manpages:fr"
max-bytes = 1000
undecodable = "skip"
"""


def _spec(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.jsonl").write_text('{"text": "one document"}\n{"text": "another one"}\n')
    path = tmp_path / "fed.toml"
    path.write_text(text)
    return path


def test_a_good_spec_parses_into_typed_parts(tmp_path):
    spec = load_spec(_spec(tmp_path, GOOD))
    assert spec.name == "two-sites" and spec.deployment == "local"
    assert spec.coordinator.base_port == 9400 and spec.coordinator.metrics_port == 0
    a, b = spec.centres
    assert (a.name, a.source, a.device, a.threads) == ("site-a", str(tmp_path / "a.jsonl"), "cpu", 2)
    assert (b.source, b.max_bytes, b.device, b.undecodable) == ("manpages:fr", 1000, "", "skip")
    cfg = spec.run_config(tmp_path / "run", {"rounds": 3})
    assert (cfg.model, cfg.rounds, cfg.expected_centres, cfg.run_name) == ("tiny", 3, 2, "run")


@pytest.mark.parametrize("change,needle", [
    (('deployment = "local"', 'deployment = "k8s"'),
     "[federation] deployment must be one of local, netns, compose; got 'k8s'"),
    (("rounds = 2", "rounds = 0"), "[config]: config key 'rounds' must be >= 1, got 0"),
    (("rounds = 2", "outer-momentum = 1.5"), "[config]: config key 'outer-momentum' must be in [0, 1)"),
    (("rounds = 2", "roundz = 2"), "[config]: unknown config key(s) roundz"),
    (("rounds = 2", "expected-centres = 5"),
     "[config] key 'expected-centres' is set by the launcher; use the number of [[centre]] tables"),
    (('source = "a.jsonl"', 'source = "missing/dir"'),
     "centre 'site-a' source 'missing/dir': no such file or directory"),
    (('source = "manpages:fr"', 'source = "hf:"'), "centre 'site-b' source 'hf:': hf: needs a dataset name"),
    (('device = "cpu"', 'device = "tpu"'), "centre 'site-a' device must be one of auto, cpu, cuda; got 'tpu'"),
    (("threads = 2", "threads = -1"), "centre 'site-a' threads must be an integer >= 0 and <= 1024; got -1"),
    (("threads = 2", "speed = 3"), "centre 'site-a' speed must be a number in (0, 1] (1 = full speed, 0.333 = 3x"),
    (('undecodable = "skip"', 'undecodable = "ignore"'), "centre 'site-b' undecodable must be one of stop, skip"),
    (('name = "site-b"', 'name = "site-a"'), "centre name 'site-a' is used twice"),
    (('name = "site-b"', 'name = "Site B"'), "centre[1] name must be 1-31 characters of a-z, 0-9 and '-'"),
    (("threads = 2", "gpus = 2"), "unknown centre[0] key(s) gpus; allowed: device, max-bytes, name"),
    (("base-port = 9400", "base-port = 70000"), "[coordinator] base-port must be an integer >= 1 and <= 65535"),
    (("[config]", "[configs]"), "unknown table(s) configs; allowed: centre, config, coordinator, federation"),
    (("metrics-port = 0", "metrics-port = 0\nkeep-metrics = true"), "keep-metrics = true needs metrics-port > 0"),
])
def test_each_mistake_names_the_file_the_key_and_what_is_allowed(tmp_path, change, needle):
    path = _spec(tmp_path, GOOD.replace(*change))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value), str(info.value)


def test_spec_errors_end_the_command_with_exit_2_before_anything_starts(tmp_path, capsys):
    path = _spec(tmp_path, GOOD.replace("rounds = 2", "inner-lr = -1.0"))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    assert f"bridgepool: error: {path}: [config]: config key 'inner-lr' must be > 0" in capsys.readouterr().err
    good = _spec(tmp_path, GOOD)
    assert main(["run", str(good), "--set", "outer-momentum=-0.1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "config key 'outer-momentum' must be in [0, 1), got -0.1 (from the command line's --set and flags, " \
           f"over {good})" in capsys.readouterr().err  # the flag's fault, not the file's
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[federation\n")
    assert main(["run", str(tmp_path / "bad.toml")]) == 2
    assert "bad.toml: not valid TOML" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_demo_is_the_builtin_spec_and_the_example_is_its_default():
    builtin = load_spec(BUILTIN_DEMO)
    assert [(c.name, c.source) for c in builtin.centres] == list(DEFAULT_CENTRES)
    example = load_spec(APP_DIR / "examples" / "demo.toml")
    assert example.centres == builtin.with_centres(3).centres and example.config == builtin.config
    assert example.coordinator == builtin.coordinator
    with pytest.raises(SpecError, match="--centres must be between 1 and 4"):
        builtin.with_centres(5)


def test_compose_from_a_spec_has_its_centres_and_mounts_local_corpora_read_only(tmp_path, capsys):
    path = _spec(tmp_path, GOOD)
    out = tmp_path / "compose.yml"
    assert main(["deploy", "compose", "--spec", str(path), "--out", str(out)]) == 0
    services = yaml.safe_load(out.read_text())["services"]
    assert {"prep-site-a", "worker-site-a", "supernode-site-b"} <= set(services)
    assert not any(s.endswith("fr-genci") for s in services)
    prep = services["prep-site-a"]
    assert f"{tmp_path / 'a.jsonl'}:/source:ro" in prep["volumes"] and "/source" in prep["command"]
    assert "manpages:fr" in services["prep-site-b"]["command"]
    submit = " ".join(services["submit"]["command"])  # the spec's [config] goes with the run
    assert 'model="tiny"' in submit and "rounds=2" in submit and "expected-centres=2" in submit
    assert main(["deploy", "compose", "--spec", str(path), "--out", str(out), "--check"]) == 0


def test_netns_takes_the_same_spec(tmp_path, capsys):
    """`deploy netns --spec` reads and validates the same file (the run itself needs root; the netns
    tests run it): a bad spec fails before any namespace is made."""
    path = _spec(tmp_path, GOOD.replace("rounds = 2", "rounds = -3"))
    assert main(["deploy", "netns", "--spec", str(path)]) == 2
    assert f"{path}: [config]: config key 'rounds' must be >= 1" in capsys.readouterr().err


def test_a_centres_own_device_and_threads_reach_its_worker(worker, tmp_path):
    """A spec's centre device/threads become its worker's flags, and its device wins over the run's."""
    from clients.worker import CentreWorker
    from deploy import commands
    from deploy.cli import _parser
    from models.config import load_defaults

    argv = commands.worker("site-a", "d", "s", "s/worker.sock", threads=2, device="cpu", speed=0.25)
    args = _parser().parse_args(argv[1:])
    assert (args.device, args.threads, args.speed) == ("cpu", 2, 0.25)
    own = CentreWorker("fr-genci", worker.data_dir, tmp_path / "state-own", device="cpu", speed=0.25)
    run = {**load_defaults(), "model": "tiny", "device": "cuda", "run-name": "r"}  # the run asks for a GPU
    assert own._trainer_for(run).device.type == "cpu"
    assert own._trainer_for(run).speed == 0.25


def test_a_centres_speed_in_the_spec_and_the_demos_one_flag(tmp_path, monkeypatch):
    """`speed` in a spec reaches the centre; `bridgepool demo --round-seconds T` sets the budget and
    makes the demo's last centre 3x slower, so that unequal centres finish each round together."""
    from deploy import cli

    spec = load_spec(_spec(tmp_path, GOOD.replace("threads = 2", "threads = 2\nspeed = 0.5")))
    assert [c.speed for c in spec.centres] == [0.5, 1.0]
    seen = {}
    monkeypatch.setattr(cli, "run_spec", lambda spec, args: seen.update(spec=spec, args=args) or 0)
    assert main(["demo", "--round-seconds", "5", "--centres", "3"]) == 0
    assert [c.speed for c in seen["spec"].centres] == [1.0, 1.0, cli.SLOW_DEMO_SPEED]
    cfg = seen["spec"].run_config(tmp_path / "run", cli.run_overrides(seen["args"]))
    assert cfg.round_seconds == 5.0 and cfg.budgeted
    assert main(["demo", "--centres", "2"]) == 0  # without the flag: fixed H, equal centres
    assert [c.speed for c in seen["spec"].centres] == [1.0, 1.0]
    assert not seen["spec"].run_config(tmp_path / "run", cli.run_overrides(seen["args"])).budgeted


def test_run_of_a_compose_spec_writes_its_compose_file(tmp_path, capsys):
    path = _spec(tmp_path, GOOD.replace('deployment = "local"', 'deployment = "compose"'))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "fed.compose.yml"
    printed = capsys.readouterr().out
    assert f"wrote {out} for 2 centres" in printed and f"docker compose -f {out} up --build" in printed
    assert "worker-site-a" in yaml.safe_load(out.read_text())["services"]


def test_a_manpages_language_that_is_not_installed_is_named_with_its_package(tmp_path):
    path = _spec(tmp_path, GOOD.replace('source = "manpages:fr"', 'source = "manpages:zz"'))
    with pytest.raises(SpecError, match=r"centre 'site-b' source 'manpages:zz': no man pages found under .*"
                                         r"apt-get install manpages-zz"):
        load_spec(path)
