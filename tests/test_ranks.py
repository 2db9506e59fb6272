"""A centre of 2 data-parallel ranks (clients/ranks.py), on CPU with gloo, tiny model, no Flower.

- equivalence: 2 ranks of batch b train a round as 1 rank of batch 2b (fp32 tolerance); the run's
  batch-size (2b) is the centre's, each rank trains its half;
- resume: fresh ranks re-train round 3 from the per-rank optimiser state on disk, bit-identical;
- a real Flower run of two 2-rank centres (`centre serve --nproc 2` under torchrun);
- a rank that dies mid-round fails the round with RankFailure naming the centre and the rank.
Each rank is a spawned process, as torchrun's would be; rank 0 drives, rank 1 follows.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clients.data import TokenSampler
from clients.training import CentreTrainer, RoundResult
from deploy.processes import free_base_port
from models.config import RunConfig, load_defaults
from models.gpt import build_model
from tests.conftest import make_centres

CENTRE = "fr-genci"
TIMEOUT = 240  # seconds for a group of spawned ranks (loaded 2-core machine)


def _cfg(run_dir: Path, batch: int = 4) -> RunConfig:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": 3, "inner-steps": 3,
                                   "batch-size": batch, "inner-warmup-steps": 1, "threads": 1, "eval-batches": 1,
                                   "run-dir": str(run_dir), "run-name": "ranks"})


def _rank(rank: int, world: int, port: int, data: str, state: str, run_dir: str, rounds: list[int],
          start: str, out: str, die_on: str, shard: bool, overlap: int) -> None:
    """One rank: rank 0 trains `rounds` from the model in `start` (or a fresh one) and saves the
    states and metrics to `out`; the others follow (or, with `die_on`, die when it comes)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from clients.ranks import RankFailure, Ranks, RankTrainer, follow, stop_followers

    ranks = Ranks.join(CENTRE, "cpu", rank, world, shard=shard)
    if rank:
        if die_on == "train":  # follows until a round's training starts, then dies as a killed rank would
            RankTrainer.follow_train = lambda *_: os._exit(3)
        follow(ranks, Path(data), Path(state))
        return
    cfg = _cfg(Path(run_dir), 4).replace(overlap_steps=overlap)
    trainer = RankTrainer(CENTRE, Path(data), Path(state), cfg, ranks)
    model = torch.load(start) if start else build_model(cfg.model, seed=cfg.seed).state_dict()  # the run's start
    saved: dict = {"start": model}
    try:
        for rnd in rounds:
            result, evaluated = _round(trainer, model, rnd)
            model = {k: v.clone() for k, v in result.state.items()}
            saved[rnd] = {"state": model, "metrics": result.metrics, "ranks": result.ranks, "eval": evaluated}
    except RankFailure as err:
        saved["failure"] = str(err)
    torch.save(saved, out)
    stop_followers(ranks)
    ranks.close()


def _round(trainer: CentreTrainer, model: dict, rnd: int) -> tuple[RoundResult, dict]:
    """A train request as the centre worker serves it (clients/worker.py): load the global model,
    evaluate it, train the round's first overlap-steps ahead from the centre's own model (none when
    overlap-steps = 0), load the global model again under them, train the rest."""
    trainer.load_global(model)
    evaluated = trainer.evaluate()
    ahead = trainer.train_ahead(rnd)
    if ahead is not None:
        trainer.load_global(model)
    return trainer.train_round(rnd, ahead), evaluated


def _run_ranks(tmp_path: Path, data: Path, rounds: list[int], start: str = "", die_on: str = "",
               shard: bool = False, overlap: int = 0) -> dict:
    port, out = free_base_port(1), tmp_path / f"rank0-{os.urandom(4).hex()}.pt"
    ctx = multiprocessing.get_context("spawn")
    args = (2, port, str(data), str(tmp_path / "state"), str(tmp_path), rounds, start, str(out), die_on, shard, overlap)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    for p in procs:
        if p.is_alive():  # nothing left running, whatever happened
            p.kill()
            p.join()
    assert procs[0].exitcode == 0, f"rank 0 exited with {procs[0].exitcode}"
    return torch.load(out)


def test_a_rank_reads_its_slice_of_the_global_batch():
    tokens = torch.randint(0, 256, (5000,)).numpy().astype("uint8")
    whole = TokenSampler(tokens, 16, 6, seed=7).batch(11)[0]
    parts = [TokenSampler(tokens, 16, 3, seed=7, rank=r, ranks=2).batch(11)[0] for r in range(2)]
    assert (whole[:3] == parts[0]).all() and (whole[3:] == parts[1]).all()
    with pytest.raises(ValueError, match="rank"):
        TokenSampler(tokens, 16, 3, seed=7, rank=2, ranks=2)


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_train_as_one_of_twice_the_batch_and_resume_bit_identical(tmp_path, corpora, shard):
    """One group of 2 ranks trains rounds 1-3; one rank of batch 2b trains rounds 1-2 beside it
    (equivalence, round 2 also checks the AdamW state carried over); fresh ranks then re-train
    round 3 from the per-rank optimiser state on disk alone (resume). DDP (each rank the whole
    model) and FSDP (`--shard`: each rank a half of every parameter and of its AdamW moments)."""
    data = corpora[CENTRE]
    two = _run_ranks(tmp_path, data, [1, 2, 3], shard=shard)
    torch.set_num_threads(1)
    one = CentreTrainer(CENTRE, data, tmp_path / "one" / "state", _cfg(tmp_path / "one", 4))
    model = two["start"]
    for rnd in (1, 2):
        result, evaluated = _round(one, model, rnd)
        assert two[rnd]["eval"]["eval-loss"] == pytest.approx(evaluated["eval-loss"], rel=1e-5)
        model = {k: v.clone() for k, v in result.state.items()}
        for k, v in model.items():
            torch.testing.assert_close(two[rnd]["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"round {rnd}: {k}")
        assert two[rnd]["metrics"]["train-loss"] == pytest.approx(result.metrics["train-loss"], rel=1e-5)
        assert two[rnd]["metrics"]["tokens"] == result.metrics["tokens"]  # the centre's whole batch
        assert len(two[rnd]["ranks"]) == 2
    assert any(not torch.equal(model[k], two["start"][k]) for k in model)  # it did train

    state = tmp_path / "state" / "ranks"
    saved = [torch.load(state / f"{prefix}inner-optim-round-0002.pt") for prefix in ("", "rank1-")]
    moments = [s["state"][0]["exp_avg"] for s in saved]  # the embedding's (vocab x n_embd) first moment
    assert [m.shape[0] for m in moments] == ([128, 128] if shard else [256, 256])  # a half each, or whole
    start = tmp_path / "after-round-2.pt"
    torch.save(two[2]["state"], start)
    cold = _run_ranks(tmp_path, data, [3], start=str(start), shard=shard)  # new processes: optimiser state from disk
    for k, v in two[3]["state"].items():
        assert torch.equal(cold[3]["state"][k], v), k


def test_two_ranks_train_ahead_as_one_rank_of_twice_the_batch(tmp_path, corpora):
    """overlap-steps with 2 ranks: round 2's first step, trained ahead from where round 1 ended on
    each rank, then added onto the global model, equals what 1 rank of batch 2b does."""
    data = corpora[CENTRE]
    two = _run_ranks(tmp_path, data, [1, 2], overlap=1)
    torch.set_num_threads(1)
    one = CentreTrainer(CENTRE, data, tmp_path / "one" / "state", _cfg(tmp_path / "one", 4).replace(overlap_steps=1))
    model = two["start"]
    for rnd in (1, 2):
        result, _ = _round(one, model, rnd)
        model = {k: v.clone() for k, v in result.state.items()}
        for k, v in model.items():
            torch.testing.assert_close(two[rnd]["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"round {rnd}: {k}")
        assert two[rnd]["metrics"]["steps-ahead"] == result.metrics["steps-ahead"] == (rnd == 2)


def test_a_rank_that_dies_fails_the_round_naming_centre_and_rank(tmp_path, corpora):
    out = _run_ranks(tmp_path, corpora[CENTRE], [1], die_on="train")
    assert 1 not in out
    assert f"centre {CENTRE}: rank 1 of 2 failed during round 1" in out["failure"]


def test_a_federation_of_two_rank_centres_trains(tmp_path, corpora):
    """The real thing, once: Flower, 2 centres of 2 ranks each (`centre serve --nproc 2` under torchrun),
    the second with its model sharded over its ranks (`--shard`, FSDP)."""
    from tests.test_federation import run_federation, tiny_config

    run_dir = tmp_path / "run"
    centres = [dataclasses.replace(c, nproc=2, shard=i == 1) for i, c in enumerate(make_centres(run_dir, corpora, 2))]
    run = run_federation(run_dir, centres, tiny_config(run_dir, rounds=2, **{"inner-steps": 8}))
    assert run["status"] == "finished", run.get("message")
    assert all(r["replied"] == 2 for r in run["rounds"])
    assert run["final"]["eval-loss-mean"] < run["rounds"][0]["eval-loss-mean"] - 0.3
    for c in centres:
        assert run["rounds"][-1]["centres"][c.name]["tokens"] == 8 * 8 * 32  # the centre's whole batch
        moments = torch.load(c.state_dir / run_dir.name / "rank1-inner-optim-round-0002.pt")["state"]
        assert moments[0]["exp_avg"].shape[0] == (128 if c.shard else 256)  # rank 1's half of the embedding's, or all
        log = (run_dir / "logs" / f"worker-{c.name}.log").read_text()
        assert "rank 1 of 2 joined" in log
    left = [p for p in Path("/proc").glob("[0-9]*/cmdline")
            if str(run_dir).encode() in _read(p) and b"--as-rank" in _read(p)]
    assert not left, "ranks left running"


def test_a_rendezvous_that_times_out_fails_the_centre_naming_the_missing_node(tmp_path):
    """A centre on 2 nodes of 2 ranks, each node started alone: node 0 waits --rdzv-timeout (3 s) for
    node 1, node 1 as long for node 0; both `centre serve` fail naming the centre and the node (and
    its ranks) that never came, without restarting (--max-restarts 0), and leave nothing running."""
    port = free_base_port(2)
    free = port + 1  # node 0 listens on `port` only: node 1 is given this one, where nobody answers

    def serve(node: int, endpoint: str) -> subprocess.Popen:
        state = tmp_path / f"node{node}"
        return subprocess.Popen([sys.executable, "-m", "deploy.cli", "centre", "serve", "--centre", CENTRE,
                                 "--data-dir", str(tmp_path / "data"), "--state-dir", str(state), "--socket",
                                 str(state / "w.sock"), "--nproc", "2", "--nnodes", "2", "--node-rank", str(node),
                                 "--rdzv-endpoint", endpoint, "--rdzv-timeout", "3", "--max-restarts", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = [serve(0, f"127.0.0.1:{port}"), serve(1, f"127.0.0.1:{free}")]
    try:
        logs = [p.communicate(timeout=180)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [1, 1], logs
    assert (f"centre {CENTRE}: the rendezvous at 127.0.0.1:{port} timed out after 3 s (--rdzv-timeout) with 1 of 2 "
            "nodes: node 1 (ranks 2-3) never joined") in logs[0]
    assert (f"centre {CENTRE}, node 1: node 0 (ranks 0-1, the centre's worker) did not answer at the rendezvous "
            f"127.0.0.1:{free} within 3 s") in logs[1]
    assert all("no restarts left" in log for log in logs)
    left = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(tmp_path).encode() in _read(p)]
    assert not left, "processes left running"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_nproc_reaches_every_place_a_centre_starts(tmp_path):
    """demo/run (spec), compose and the torchrun re-launch all carry a centre's ranks; torchrun and
    `centre serve` accept the command lines they are given."""
    from torch.distributed.run import get_args_parser

    from clients.launch import launch_argv
    from deploy import commands, compose
    from deploy.cli import LAUNCH_FLAGS, _parser, strip_flags
    from deploy.local import LocalFederation
    from deploy.spec import BUILTIN_DEMO, SpecError, load_spec

    spec = load_spec(BUILTIN_DEMO).with_centres(2).with_nproc(2)
    assert spec.nprocs() == {"fr-genci": 2, "de-lrz": 2}
    with pytest.raises(SpecError, match="--nproc-per-centre must be between 1 and"):
        spec.with_nproc(0)
    centre = dataclasses.replace(_centre(tmp_path), nproc=2)
    argv = LocalFederation(tmp_path / "run", [centre])._worker_argv(centre)
    args = _parser().parse_args(argv[3:])  # python -m deploy.cli ...
    assert args.nproc == 2
    services = compose.compose(centres=[("fr-genci", "manpages:fr")], nproc={"fr-genci": 2})["services"]
    command = services["worker-fr-genci"]["command"]
    assert command[command.index("--nproc") + 1] == "2"
    assert "--nproc" not in commands.worker("fr-genci", "d", "s", "s/w.sock")  # one rank: today's command line
    inner = ["deploy.cli", *strip_flags([*argv[3:], "--nnodes=1"], LAUNCH_FLAGS), "--as-rank"]
    assert "--nproc" not in inner and not any(a.startswith("--nnodes") for a in inner)
    assert _parser().parse_args(inner[1:]).as_rank
    for torchrun in (launch_argv(inner, 2), launch_argv(inner, 2, nnodes=2, node_rank=1, rdzv_endpoint="h:29500")):
        parsed = get_args_parser().parse_args(torchrun[3:])
        assert parsed.nproc_per_node == "2" and parsed.module and parsed.training_script == "deploy.cli"
    with pytest.raises(ValueError, match="HOST:PORT"):
        launch_argv(inner, 2, nnodes=2, node_rank=1)


def test_shard_reaches_every_place_a_centre_starts_and_is_refused_where_it_cannot_work(tmp_path):
    """--shard: in demo/run (spec), compose and the ranks' own command line; refused, naming the flag,
    with one rank (CLI, spec, --nproc-per-centre) and with overlap-steps (the trainer)."""
    from clients.ranks import Ranks, RankTrainer
    from deploy import compose
    from deploy.cli import LAUNCH_FLAGS, _parser, strip_flags
    from deploy.local import LocalFederation
    from deploy.spec import BUILTIN_DEMO, SpecError, load_spec

    spec = load_spec(BUILTIN_DEMO).with_centres(2).with_nproc(2).with_shard()
    assert spec.shards() == {"fr-genci", "de-lrz"}
    with pytest.raises(SpecError, match="--shard .* add --nproc-per-centre 2"):
        load_spec(BUILTIN_DEMO).with_centres(2).with_shard()
    own = tmp_path / "spec.toml"
    own.write_text('[[centre]]\nname = "a"\nsource = "manpages:fr"\nshard = true\n')
    with pytest.raises(SpecError, match="centre 'a' shard = true .* needs nproc >= 2"):
        load_spec(own)
    centre = dataclasses.replace(_centre(tmp_path), nproc=2, shard=True)
    argv = LocalFederation(tmp_path / "run", [centre])._worker_argv(centre)
    args = _parser().parse_args(argv[3:])
    assert args.nproc == 2 and args.shard
    assert _parser().parse_args([*strip_flags(argv[3:], LAUNCH_FLAGS), "--as-rank"]).shard  # every rank is told
    services = compose.compose(centres=[("fr-genci", "manpages:fr")], nproc={"fr-genci": 2}, shard={"fr-genci"})
    assert "--shard" in services["services"]["worker-fr-genci"]["command"]
    one = _parser().parse_args([*strip_flags(argv[3:], ("--nproc",)), "--nproc", "1"])
    with pytest.raises(ValueError, match="--shard .* --nproc 1 x --nnodes 1 is 1 rank"):
        one.func(one)
    cfg = _cfg(tmp_path, 4)
    with pytest.raises(ValueError, match="--shard splits the model .* needs at least 2"):
        RankTrainer(CENTRE, tmp_path, tmp_path / "state", cfg, Ranks(CENTRE, 0, 1, shard=True))
    with pytest.raises(ValueError, match="--shard does not support overlap-steps"):
        RankTrainer(CENTRE, tmp_path, tmp_path / "state", cfg.replace(overlap_steps=1), Ranks(CENTRE, 0, 2, shard=True))


def _centre(root: Path):
    from deploy.local import centre_dirs

    return centre_dirs(root, CENTRE)
