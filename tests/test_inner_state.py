"""A restarted coordinator re-sends a round the centre has already trained: the centre must
start it from the inner-optimiser state saved after the previous round, not from what it
holds in memory (pure torch, tiny model, no Flower)."""

from __future__ import annotations

import torch

from clients.training import CentreTrainer
from models.config import RunConfig, load_defaults


def _cfg(run_dir) -> RunConfig:
    return RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": 4, "inner-steps": 3,
                                   "batch-size": 4, "inner-warmup-steps": 2, "threads": 1, "eval-batches": 1,
                                   "run-dir": str(run_dir), "run-name": "inner"})


def _train(trainer: CentreTrainer, global_state: dict, rnd: int) -> dict[str, torch.Tensor]:
    trainer.load_global(global_state)
    return {k: v.clone() for k, v in trainer.train_round(rnd).state.items()}  # state aliases the live model


def test_a_re_sent_round_starts_from_the_saved_state(tmp_path, corpora):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check(tmp_path, corpora)
    finally:
        torch.set_num_threads(threads)


def _check(tmp_path, corpora) -> None:
    cfg, data = _cfg(tmp_path), corpora["fr-genci"]
    warm = CentreTrainer("fr-genci", data, tmp_path / "state", cfg)
    g1 = {k: v.clone() for k, v in warm.model.state_dict().items()}
    g2 = _train(warm, g1, 1)
    g3 = _train(warm, g2, 2)
    first = _train(warm, g3, 3)  # the warm worker now holds the state after round 3

    again = _train(warm, g3, 3)  # the coordinator restarted and sends round 3 again
    cold = _train(CentreTrainer("fr-genci", data, tmp_path / "state", cfg), g3, 3)  # a restarted worker
    for k in first:
        assert torch.equal(first[k], again[k]), k
        assert torch.equal(first[k], cold[k]), k
    assert any(not torch.equal(first[k], g3[k]) for k in first)  # round 3 did train


def test_each_rounds_state_is_written_over_the_oldest_file_and_reads_back_whole(tmp_path, corpora):
    """The inner AdamW state is written every round over the file of the oldest round kept (in place:
    its pages are still cached), renamed first, so a crash mid-write leaves the newer rounds' files;
    what a restarted worker reads back is the live state, value for value."""
    cfg, data = _cfg(tmp_path), corpora["fr-genci"]
    warm = CentreTrainer("fr-genci", data, tmp_path / "state", cfg)
    run_state = tmp_path / "state" / "inner"
    g = {k: v.clone() for k, v in warm.model.state_dict().items()}
    inodes = {}
    for rnd in range(1, 6):
        g = _train(warm, g, rnd)
        inodes[rnd] = (run_state / f"inner-optim-round-{rnd:04d}.pt").stat().st_ino
        if rnd == 2:  # round 5 writes over this file: longer than the state, its tail must go
            with open(run_state / "inner-optim-round-0002.pt", "ab") as f:
                f.write(b"\0" * (1 << 20))
        if rnd == 3:  # a crash's leftover of another round: not kept past the next write
            (run_state / "inner-optim-round-0009.tmp").write_bytes(b"partial")
    assert sorted(p.name for p in run_state.glob("inner-optim-round-*")) == [
        f"inner-optim-round-{r:04d}.pt" for r in (3, 4, 5)]
    assert (inodes[4], inodes[5]) == (inodes[1], inodes[2])  # written over rounds 1 and 2's files
    assert not list(run_state.glob("*.tmp"))
    sizes = {(run_state / f"inner-optim-round-{r:04d}.pt").stat().st_size for r in (4, 5)}
    assert len(sizes) == 1  # round 5's file was cut to its state's size
    cold = CentreTrainer("fr-genci", data, tmp_path / "state", cfg)
    cold._load_optim(5)
    live, saved = warm.optim.state_dict()["state"], cold.optim.state_dict()["state"]
    assert live.keys() == saved.keys() and live
    for i in live:
        for k in live[i]:
            assert torch.equal(live[i][k], saved[i][k]), (i, k)


def test_the_state_is_kept_for_checkpointed_rounds_only_and_a_restart_resumes_from_one(tmp_path, corpora):
    """checkpoint-every = 2: the centre writes its AdamW state after rounds 2, 4 and the last (5) only,
    keeps checkpoint-keep of them, and holds the other rounds' in memory; a worker restarted when the
    coordinator resumes from round 4's checkpoint trains round 5 bit-equal to the warm one."""
    cfg = RunConfig.from_mapping({**_cfg(tmp_path).to_mapping(), "rounds": 5, "checkpoint-every": 2,
                                  "checkpoint-keep": 2})
    data, run_state = corpora["fr-genci"], tmp_path / "state" / "inner"
    warm = CentreTrainer("fr-genci", data, tmp_path / "state", cfg)
    g = {k: v.clone() for k, v in warm.model.state_dict().items()}
    for rnd in range(1, 5):
        g = _train(warm, g, rnd)
        saved = sorted(p.name for p in run_state.glob("inner-optim-round-*"))
        assert saved == [f"inner-optim-round-{r:04d}.pt" for r in (2, 4) if r <= rnd], (rnd, saved)
    first = _train(warm, g, 5)
    cold = _train(CentreTrainer("fr-genci", data, tmp_path / "state", cfg), g, 5)
    for k in first:
        assert torch.equal(first[k], cold[k]), k
    assert sorted(p.name for p in run_state.glob("inner-optim-round-*")) == [
        "inner-optim-round-0004.pt", "inner-optim-round-0005.pt"]
