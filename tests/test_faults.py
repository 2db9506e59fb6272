"""Faults on real processes (Flower Deployment Engine, tiny model, short rounds).

Two federations, kept short for CI: (1) 4 centres with a quorum of 3: a centre
dies mid-round, is restarted and rejoins; then two die, the run stops below
quorum and resumes from its checkpoint. (2) 3 centres, one hostile (every update
poisoned differently), and the coordinator (SuperLink + ServerApp) killed and
restarted while the centres' workers keep running; the final model must equal,
bit for bit, the same maths run in-process on the honest centres alone.
Figures (rejoin time, round times) are printed, not asserted.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from clients.training import CentreTrainer
from deploy.local import Centre, LocalFederation
from models.config import RunConfig
from models.gpt import build_model
from server.aggregation import OuterOptimizer, aggregate
from tests.conftest import free_base_port, make_centres, wait_for_checkpoint
from tests.hostile_worker import POISONS
from tests.test_federation import tiny_config

REASONS = {"nan": "non-finite", "norm": "norm-outlier", "huge": "too-large", "dtype": "dtype",
           "extra-key": "keys", "short": "shape"}


def _accepted(record: dict, centre: str) -> bool:
    return centre in record["centres"] and centre not in record["failed"]


def _finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


def test_centre_death_rejoin_then_quorum_loss_and_resume(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 4)
    victim, second = centres[3].name, centres[2].name
    # Rounds take ~1-2 s: enough of them that the run is still going when the victim is back
    # (it stops at the quorum loss after the rejoin; the resumed run finishes the rest).
    cfg = tiny_config(run_dir, rounds=30, **{"inner-steps": 5, "expected-centres": 4, "min-centres": 3,
                                            "round-timeout": 45.0})
    seen: dict = {}

    with LocalFederation(run_dir, centres, base_port=free_base_port(2 + len(centres))) as fed:
        def tick(run: dict) -> None:
            rounds = run.get("rounds", [])
            done = rounds[-1]["round"] if rounds else 0
            if done >= 1 and "killed" not in seen:
                fed.kill_centre(victim)  # round 2 is under way
                seen["killed"] = done
            elif "killed" in seen and done > seen["killed"] and "restarted" not in seen:
                seen["restarted"] = time.time()
                fed.restart_centre(victim)
            elif "restarted" in seen and "rejoined" not in seen:
                back = [r for r in rounds if r["time"] > seen["restarted"] and _accepted(r, victim)]
                if back:
                    seen["rejoined"] = back[0]
                    fed.kill_centre(victim)  # 2 of 4 left: the next round cannot reach the quorum
                    fed.kill_centre(second)
                    seen["quorum-lost-after"] = done

        t0 = time.monotonic()
        run = fed.wait(fed.submit(cfg.to_mapping()), on_tick=tick, timeout=600)
        first_wall = time.monotonic() - t0

        assert "rejoined" in seen, (run.get("status"), run.get("message"), seen)
        # The round during which the victim was killed: the one under way when the tick saw round
        # `killed` done, or (rounds take < 1 s) the next, if the victim had already replied.
        died = next(r for r in run["rounds"][seen["killed"]:] if any(k.startswith(victim) for k in r["failed"]))
        assert died["round"] in (seen["killed"] + 1, seen["killed"] + 2), (died["round"], seen)
        assert died["replied"] == 3
        # The round closed on the other three: at the deadline ("no reply"), earlier when Flower
        # already reported the node's heartbeat as expired ("Node Unavailable"), or, when it died
        # while uploading its reply, once the pull of the reply's missing objects (bounded by the
        # time left, server/messaging.py) gave up: Flower's "Reply message objects are unavailable".
        died_as = ("no reply", "Node Unavailable", "Reply message objects are unavailable")
        assert any(k.startswith(victim) and any(d in v for d in died_as)
                   for k, v in died["failed"].items()), died["failed"]
        rejoin = seen["rejoined"]["time"] - seen["restarted"]
        print(f"\nrejoin: {rejoin:.1f}s from restart to the end of round {seen['rejoined']['round']} "
              f"with {victim}'s update; round wall times {[round(r['wall-seconds'], 1) for r in run['rounds']]}")
        # Flower lists a killed SuperNode for 30-60 s more. The next round either is told by Flower
        # that the node is gone (heartbeat expired) or, as it missed a round, closes on the quorum
        # without waiting for it; either way not at the deadline.
        after = run["rounds"][died["round"]]  # the round after `died` (rounds are numbered from 1)
        assert all(k.startswith(victim) and ("not waited for" in v or "Node Unavailable" in v)
                   for k, v in after["failed"].items()), after["failed"]

        assert run["status"] == "failed"
        assert "below the quorum of 3" in run["message"] and "resume" in run["message"], run["message"]
        # They were killed once round q was seen done; round q + 1 may already have had one of
        # their replies (rounds take < 1 s), then it closes on 3 and the next one loses the quorum.
        stopped_after = run["rounds"][-1]["round"]
        assert stopped_after in (seen["quorum-lost-after"], seen["quorum-lost-after"] + 1), (stopped_after, seen)
        assert f"stopped after round {stopped_after}" in run["message"], run["message"]
        # ...at that round's deadline, even when a centre died in the middle of uploading its reply.
        assert run["finished"] - run["rounds"][-1]["time"] < cfg.round_timeout + 30, run["message"]
        assert (run_dir / "checkpoints" / f"round-{stopped_after:04d}").exists()

        fed.restart_centre(victim)
        fed.restart_centre(second)
        t0 = time.monotonic()
        resumed = fed.wait(fed.submit(cfg.replace(resume=True).to_mapping()), timeout=600)
        print(f"first run {first_wall:.0f}s, resumed run {time.monotonic() - t0:.0f}s")

    assert resumed["status"] == "finished", resumed.get("message")
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, cfg.rounds + 1))
    assert any(e["event"] == "resumed-from" and e["round"] == stopped_after for e in resumed["events"])
    assert all(r["replied"] >= 3 for r in resumed["rounds"])
    assert _finite(run_dir / "final_model.safetensors")


class _HostileFederation(LocalFederation):
    """One centre runs tests/hostile_worker.py instead of `bridgepool centre serve`."""

    hostile = ""

    def _worker_argv(self, c: Centre) -> list[str]:
        argv = super()._worker_argv(c)
        if c.name != self.hostile:
            return argv
        i = argv.index("deploy.cli")
        return [*argv[:i], "tests.hostile_worker", *argv[i + 3:]]  # drop "deploy.cli centre serve"


def test_hostile_centre_rejected_and_coordinator_restart_keeps_weights(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 3)
    hostile = centres[2].name
    # Poisons of every form travel in Flower's replies, where only the server's validation stands between
    # them and the model (on the data plane the centre's upload is refused on arrival: tests/test_dataplane.py).
    cfg = tiny_config(run_dir, rounds=len(POISONS), **{"inner-steps": 5, "expected-centres": 3,
                                                      "min-centres": 2, "data-plane": "flower"})
    kill_after = 2
    fed = _HostileFederation(run_dir, centres, base_port=free_base_port(2 + len(centres)), durable_superlink=True)
    fed.hostile = hostile
    with fed:
        def tick(run: dict) -> None:
            if run.get("rounds") and run["rounds"][-1]["round"] >= kill_after:
                raise _Stop

        try:
            fed.wait(fed.submit(cfg.to_mapping()), on_tick=tick, timeout=600)
        except _Stop:
            pass
        wait_for_checkpoint(run_dir, kill_after)
        workers = {p.name: p.popen.pid for p in fed.group.procs if p.name.startswith("worker")}
        t0 = time.monotonic()
        fed.kill_server()  # a later round is under way on the centres
        fed.restart_server()
        # The killed ServerApp's run is stopped, not left running: SuperNodes that were pulling its
        # round's message take the resumed run's at once, not when Flower times the old run out.
        assert not [r for r in fed.runs() if r["status"].startswith("running")], fed.runs()
        run = fed.wait(fed.submit(cfg.replace(resume=True).to_mapping()), timeout=600)
        print(f"\ncoordinator restart to finished run: {time.monotonic() - t0:.0f}s")
        assert {p.name: p.popen.pid for p in fed.group.procs if p.name.startswith("worker")} == workers

    assert run["status"] == "finished", run.get("message")
    assert [r["round"] for r in run["rounds"]] == list(range(1, cfg.rounds + 1))
    assert any(e["event"] == "resumed-from" and e["round"] >= kill_after for e in run["events"])
    for rec, kind in zip(run["rounds"], POISONS, strict=True):
        assert rec["replied"] == 2
        assert rec["failed"].get(hostile, "").startswith(f"rejected ({REASONS[kind]})"), (kind, rec["failed"])
    final = load_file(run_dir / "final_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    # The hostile centre changed nothing: same weights as the honest centres' maths, in-process.
    expected = _honest_reference(cfg, centres[:2], tmp_path / "reference")
    for k, v in expected.items():
        assert torch.equal(final[k], v), k


def _honest_reference(cfg: RunConfig, centres: list[Centre], state_root: Path) -> dict[str, torch.Tensor]:
    """The federation's maths without Flower: each honest centre trains from the global model,
    the server aggregates in centre-name order (as server/app.py does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # as the workers run; float sums depend on it
    try:
        state = {k: v.float() for k, v in build_model(cfg.model, seed=cfg.seed).state_dict().items()}
        outer = OuterOptimizer(state, cfg.strategy, cfg.outer_lr, cfg.outer_momentum)
        trainers = [CentreTrainer(c.name, c.data_dir, state_root / c.name, cfg)
                    for c in sorted(centres, key=lambda c: c.name)]
        reference = outer.state()
        for rnd in range(1, cfg.rounds + 1):
            results = []
            for t in trainers:
                t.load_global(reference)
                results.append(t.train_round(rnd))
            reference = aggregate(outer, [r.state for r in results], [r.metrics["tokens"] for r in results],
                                  cfg.aggregator)
        assert all(math.isfinite(float(v.sum())) for v in reference.values())
        return reference
    finally:
        torch.set_num_threads(threads)


class _Stop(Exception):
    pass
