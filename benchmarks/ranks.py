"""One centre's training throughput with 1 and 2 data-parallel ranks (clients/ranks.py), side by side.

    bridgepool bench --ranks                # tiny and small, 1 rank x 2 threads vs 2 ranks x 1 thread
    bridgepool bench --ranks --quick        # tiny only, fewer steps
    bridgepool bench --ranks --shard        # 2 ranks: DDP (whole model each) vs FSDP (--shard, half each)

No Flower: the centre's own round, `train_round` of H inner steps, as the worker runs it; each rank
a spawned process joined by gloo, as torchrun's are. The same cores in both cases (the threads are
split among the ranks), the same run batch-size (the centre's; each of 2 ranks trains half), so the
ratio says what DDP's all-reduce costs or saves on this machine, not what more hardware would give.
Round 1 warms up (allocations, first-touch); the figures are round 2's. tokens/s is the centre's
(tokens of the whole batch over the round's compute seconds, as the worker reports it). Each set-up
runs twice, interleaved (1, 2, 2, 1 ranks), and the faster try of each is reported (both tries are
in the JSON): on a machine shared with other jobs, the slower try measures the other jobs.

With --shard the two set-ups are 2 ranks under DDP and 2 ranks under FSDP (`--shard`, clients/shard.py),
with the bytes of weights and AdamW moments rank 0 holds between rounds (its local shards under FSDP),
counted from the tensors themselves.

Writes OUT/STEM.json and OUT/STEM.md (default benchmarks/results/ranks_<hardware>_<date>, or
ranks-shard_... with --shard).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from clients.data import prepare_centre
from deploy.processes import free_base_port
from models.config import RunConfig, load_defaults
from models.gpt import build_model

CENTRE, SOURCE = "fr-genci", "manpages:fr"
RUN = {"rounds": 2, "inner-steps": 10, "batch-size": 8, "inner-warmup-steps": 1, "eval-batches": 1}
MODELS = ("tiny", "small")


def _rank(rank: int, world: int, port: int, threads: int, data: str, state: str, config: dict[str, Any],
          out: str, shard: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from clients.ranks import Ranks, RankTrainer, follow, stop_followers

    ranks = Ranks.join(CENTRE, "cpu", rank, world, shard=shard)
    if rank:
        follow(ranks, Path(data), Path(state))
        return
    cfg = RunConfig.from_mapping(config)
    trainer = RankTrainer(CENTRE, Path(data), Path(state), cfg, ranks)
    model = build_model(cfg.model, seed=cfg.seed).state_dict()  # the trainer's own start (sharded: DTensors)
    rounds = []
    for rnd in range(1, cfg.rounds + 1):
        trainer.load_global(model)
        result = trainer.train_round(rnd)
        model = {k: v.clone() for k, v in result.state.items()}
        rounds.append({**result.metrics, "ranks": result.ranks, "held-bytes-rank-0": held_bytes(trainer)})
    Path(out).write_text(json.dumps(rounds))
    stop_followers(ranks)
    ranks.close()


def held_bytes(trainer: Any) -> int:
    """Bytes of the weights and AdamW moments this rank holds (its local shards under FSDP)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [*trainer.model.parameters(),
               *(v for s in trainer.optim.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())]
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def centre_round(world: int, cores: int, data: Path, work: Path, config: dict[str, Any],
                 shard: bool = False) -> list[dict[str, Any]]:
    """The figures of each round of one centre of `world` ranks sharing `cores` threads."""
    out = work / f"rounds-{world}.json"
    ctx = multiprocessing.get_context("spawn")
    args = (world, free_base_port(1), max(1, cores // world), str(data), str(work / f"state-{world}-{shard}"),
            config, str(out), shard)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank of the {world}-rank centre failed: exit codes {[p.exitcode for p in procs]}")
    return json.loads(out.read_text())


def _interleaved(models: tuple[str, ...], run: dict[str, Any], cores: int, name: str,
                 setups: tuple[Any, Any], measure: Callable[[Any, Path, dict[str, Any]], dict[str, Any]],
                 ) -> Iterator[tuple[str, dict[Any, list[dict[str, Any]]], dict[str, Any], dict[str, Any]]]:
    """For each model: (model, every try, the faster try of each set-up). Each set-up is tried twice,
    interleaved (a, b, b, a), so both see the same load on a shared machine; the faster try is what
    the set-up can do when the machine lets it. `measure(setup, work, config)`: one try's metrics."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        work = Path(tmp)
        prepare_centre(SOURCE, work / "data", max_bytes=300_000)
        for model in models:
            config = {**load_defaults(), **run, "model": model, "threads": cores, "run-dir": str(work),
                      "run-name": f"{name}-{model}"}
            a, b = setups
            tries: dict[Any, list[dict[str, Any]]] = {a: [], b: []}
            for setup in (a, b, b, a):
                tries[setup].append(measure(setup, work, config))
            first, second = (max(tries[x], key=lambda m: m["tokens-per-second"]) for x in setups)
            yield model, tries, first, second


def _result(run: dict[str, Any], cores: int, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    from benchmarks.federation import _environment, _hardware

    return {"date": time.strftime("%Y-%m-%d"), "hardware": _hardware(), "environment": _environment(),
            "cores": cores, "backend": "gloo", "run": run, "rows": rows, **extra}


def run(models: tuple[str, ...], run: dict[str, Any], cores: int) -> dict[str, Any]:
    rows = []
    for model, tries, one, two in _interleaved(
            models, run, cores, "ranks", (1, 2),
            lambda world, work, config: centre_round(world, cores, work / "data", work, config)[-1]):
        rows.append({"model": model, "tokens-per-round": one["tokens"],
                     "tokens-per-second-1-rank": one["tokens-per-second"],
                     "tokens-per-second-2-ranks": two["tokens-per-second"],
                     "tries-tokens-per-second": {w: [m["tokens-per-second"] for m in t] for w, t in tries.items()},
                     "ratio-2-over-1": two["tokens-per-second"] / one["tokens-per-second"],
                     "train-loss-1-rank": one["train-loss"], "train-loss-2-ranks": two["train-loss"],
                     "step-seconds-mean-per-rank-2-ranks": [r["step-seconds-mean"] for r in two["ranks"]],
                     "peak-rss-bytes-per-rank-2-ranks": [r["peak-memory-bytes"] for r in two["ranks"]]})
    return _result(run, cores, rows)


def run_shard(models: tuple[str, ...], run: dict[str, Any], cores: int) -> dict[str, Any]:
    """2 ranks under DDP against 2 ranks under FSDP (--shard), interleaved, the faster try of each."""
    rows = []
    for model, tries, ddp, fsdp in _interleaved(
            models, run, cores, "shard", (False, True),
            lambda shard, work, config: centre_round(2, cores, work / "data", work, config, shard)[-1]):
        rows.append({"model": model, "tokens-per-round": ddp["tokens"],
                     "tokens-per-second-ddp": ddp["tokens-per-second"],
                     "tokens-per-second-fsdp": fsdp["tokens-per-second"],
                     "tries-tokens-per-second": {("fsdp" if s else "ddp"): [m["tokens-per-second"] for m in t]
                                                 for s, t in tries.items()},
                     "ratio-fsdp-over-ddp": fsdp["tokens-per-second"] / ddp["tokens-per-second"],
                     "held-bytes-rank-0-ddp": ddp["held-bytes-rank-0"],
                     "held-bytes-rank-0-fsdp": fsdp["held-bytes-rank-0"],
                     "train-loss-ddp": ddp["train-loss"], "train-loss-fsdp": fsdp["train-loss"]})
    return _result(run, cores, rows, shard=True)


def markdown_shard(result: dict[str, Any]) -> str:
    lines = [f"# One centre of 2 ranks, DDP vs FSDP (--shard), gloo, CPU, {result['date']}", "",
             f"Hardware: {result['hardware']}; {result['cores']} cores shared by the 2 ranks (1 thread each); "
             f"{json.dumps(result['environment'])}.",
             f"Run: {json.dumps(result['run'])}; figures of round {result['run']['rounds']} (round 1 warms up); "
             "the faster of 2 interleaved tries of each set-up (both in the JSON).",
             "Command: `bridgepool bench --ranks --shard`. No GPU was lent to this session: FSDP on nccl is "
             "untested here.", "",
             "| model | tokens/round | tokens/s, DDP | tokens/s, FSDP | FSDP / DDP | tries DDP / FSDP | "
             "weights + AdamW bytes on rank 0, DDP / FSDP | train loss DDP / FSDP |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tries = r["tries-tokens-per-second"]
        lines.append(f"| {r['model']} | {r['tokens-per-round']:.0f} | {r['tokens-per-second-ddp']:.0f} | "
                     f"{r['tokens-per-second-fsdp']:.0f} | {r['ratio-fsdp-over-ddp']:.2f} | "
                     f"{', '.join(f'{x:.0f}' for x in tries['ddp'])} / {', '.join(f'{x:.0f}' for x in tries['fsdp'])}"
                     f" | {r['held-bytes-rank-0-ddp']:,} / {r['held-bytes-rank-0-fsdp']:,} | "
                     f"{r['train-loss-ddp']:.4f} / {r['train-loss-fsdp']:.4f} |")
    lines += ["", "Reading it: FSDP holds half the weights and AdamW moments per rank (the bytes column, counted",
              "from the tensors) and pays for it with an all-gather of each block's weights in every forward and",
              "backward and a reduce-scatter of its gradients, over loopback TCP (gloo) here. On 2 shared cores",
              "that traffic is pure cost; what FSDP buys is fitting a model no single device holds, which this",
              "machine cannot show. The machine was shared with other sessions' tests: tokens/s vary between tries.",
              ""]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    if result.get("shard"):
        return markdown_shard(result)
    lines = [f"# One centre, 1 vs 2 data-parallel ranks (gloo, CPU), {result['date']}", "",
             f"Hardware: {result['hardware']}; {result['cores']} cores shared (1 rank x {result['cores']} threads "
             f"against 2 ranks x {max(1, result['cores'] // 2)} thread(s)); {json.dumps(result['environment'])}.",
             f"Run: {json.dumps(result['run'])}; figures of round {result['run']['rounds']} (round 1 warms up); "
             "the faster of 2 interleaved tries of each set-up (both in the JSON).",
             "Command: `bridgepool bench --ranks`. No GPU was lent to this session: nccl is untested here.", "",
             "| model | tokens/round | tokens/s, 1 rank | tokens/s, 2 ranks | 2 / 1 | tries 1 rank / 2 ranks | "
             "train loss 1 / 2 ranks |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tries = {int(w): t for w, t in r["tries-tokens-per-second"].items()}
        lines.append(f"| {r['model']} | {r['tokens-per-round']:.0f} | {r['tokens-per-second-1-rank']:.0f} | "
                     f"{r['tokens-per-second-2-ranks']:.0f} | {r['ratio-2-over-1']:.2f} | "
                     f"{', '.join(f'{x:.0f}' for x in tries[1])} / {', '.join(f'{x:.0f}' for x in tries[2])} | "
                     f"{r['train-loss-1-rank']:.4f} / {r['train-loss-2-ranks']:.4f} |")
    lines += ["", "Reading it: both set-ups share the same cores, so this measures what splitting the centre's",
              "batch over ranks costs (the gradient all-reduce over loopback TCP, gloo) against splitting each",
              "operation over threads, not what more hardware gives. With ops too small to split well (tiny),",
              "one rank's 2 OpenMP threads stall each other on a machine other jobs also use (a descheduled",
              "thread holds up every op: compare its two tries), so single-thread ranks win by far; with",
              "larger ops (small) threads work and the all-reduce is the visible cost. The machine was shared",
              "with other sessions' tests while this ran: absolute tokens/s vary between tries. The figure",
              "that matters, ranks on separate GPUs or nodes (nccl), needs hardware this session did not have.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bridgepool bench --ranks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny only, 4 inner steps")
    p.add_argument("--shard", action="store_true", help="2 ranks: DDP against FSDP (--shard)")
    p.add_argument("--cores", type=int, default=2, help="threads shared by the centre's ranks (default 2)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    p.add_argument("--tag", default="", help="file name stem; default ranks_<hardware>_<date>")
    p.add_argument("--render", type=Path, metavar="JSON", help="only write the .md of a results JSON")
    args = p.parse_args(argv)
    from benchmarks.federation import _hardware

    args.stem = args.tag or f"ranks{'-shard' if args.shard else ''}_{_hardware()}_{time.strftime('%Y-%m-%d')}"
    models, config = (("tiny",), {**RUN, "inner-steps": 4}) if args.quick else (MODELS, RUN)
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    result = (run_shard if args.shard else run)(models, config, args.cores)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
