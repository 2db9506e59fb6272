"""What pooling gives each member: every centre alone against the pooled DiLoCo model.

    bridgepool bench --pooling                   # the committed configuration (~15 min on 2 loaded cores)
    bridgepool bench --pooling --quick --out D   # toy size (the smoke test)

For each compute budget (inner steps per centre) and each centre:
- **solo**: the same model trained on that centre's data alone, with the same inner optimiser, the same
  learning-rate schedule and the same number of inner steps the centre gives the federation
  (clients/training.py's CentreTrainer, rounds x H steps, no outer step: nothing to average);
- **pooled**: the federation's DiLoCo model (real Flower run, benchmarks/federation.py's `flower`), where the
  centre spends exactly that many inner steps.

Then every model (each solo one and the pooled one) is scored on every centre's held-out split: the
cross-evaluation matrix, drawn as a heat map per budget. Budgets differ in how many passes over its own
data a centre makes ("epochs"); that is where pooling changes from costing to paying.

Writes OUT/STEM.json, OUT/STEM.md and OUT/STEM_heatmap.png.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import federation
from benchmarks.baselines import evaluate_state
from clients.data import DEFAULT_CENTRES, load_split, prepare_centre
from clients.training import CentreTrainer
from models.config import RunConfig
from server.checkpoint import latest_checkpoint

POOLED = "pooled (DiLoCo)"


@dataclass(frozen=True)
class PoolPlan:
    model: str
    centres: int
    max_bytes: int  # per centre corpus (small on purpose: a budget can then exceed one pass over it)
    h: int  # inner steps per round (pooled) = the solo loop's steps per "round" (its lr schedule, saving)
    budgets: tuple[int, ...]  # inner steps per centre over the whole run, one full comparison each
    eval_batches: int = 16


FULL = PoolPlan(model="small", centres=3, max_bytes=100_000, h=50, budgets=(50, 300))
QUICK = PoolPlan(model="tiny", centres=2, max_bytes=40_000, h=4, budgets=(8,), eval_batches=2)


def solo_name(centre: str) -> str:
    return f"{centre} alone"


def run_all(plan: PoolPlan) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bridgepool-pooling-"))
    try:
        corpora: dict[str, Path] = {}
        for name, source in DEFAULT_CENTRES[: plan.centres]:
            corpora[name] = work / "corpora" / name
            prepare_centre(source, corpora[name], max_bytes=plan.max_bytes)
        train_tokens = {n: int(load_split(d, "train", n).size) for n, d in corpora.items()}
        out = {"plan": asdict(plan), "train-tokens": train_tokens, "budgets": [],
               "environment": federation._environment(), "load": _load()}
        for steps in plan.budgets:
            t0 = time.monotonic()
            out["budgets"].append(compare(plan, corpora, work / f"steps-{steps}", steps, train_tokens))
            out["budgets"][-1]["wall"] = time.monotonic() - t0  # pooled run, solo runs and scoring
            print(f"[pooling] {steps} steps per centre: {out['budgets'][-1]['wall']:.0f} s", flush=True)
        out["load"] = {"before": out["load"], "after": _load()}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(plan: PoolPlan, corpora: dict[str, Path], work: Path, steps: int,
            train_tokens: dict[str, int]) -> dict[str, Any]:
    """One budget: the pooled run, each centre's solo run, and every model scored on every centre."""
    if steps % plan.h:
        raise ValueError(f"budget {steps} steps is not a whole number of rounds of H={plan.h}")
    rounds = steps // plan.h
    fplan = federation.Plan(model=plan.model, centres=plan.centres, steps=steps, hs=(plan.h,),
                            max_bytes=plan.max_bytes, fixed_rounds=0)
    over = {"rounds": rounds, "inner-steps": plan.h, "strategy": "diloco", "eval-batches": plan.eval_batches}
    t0 = time.monotonic()
    pooled = federation.flower(fplan, corpora, work, "pooled", **over)
    print(f"[pooling] {steps} steps: pooled run {time.monotonic() - t0:.0f} s", flush=True)
    ckpt = latest_checkpoint(work / "pooled")
    if ckpt is None or ckpt.round != rounds:
        raise RuntimeError(f"pooled run left no checkpoint of round {rounds} in {work / 'pooled'}")
    cfg = federation.run_config(fplan, work / "solo", **over)
    t0 = time.monotonic()
    solos = solo_runs(corpora, cfg, work / "solo")
    print(f"[pooling] {steps} steps: solo runs {time.monotonic() - t0:.0f} s", flush=True)
    models = {POOLED: ckpt.model, **{solo_name(n): s["state"] for n, s in solos.items()}}
    matrix = {m: evaluate_state(state, corpora, cfg, work / "eval" / m.replace(" ", "-"))
              for m, state in models.items()}
    seq = cfg.seq_len or _block_size(cfg)
    tokens = steps * cfg.batch_size * seq
    return {"steps": steps, "rounds": rounds, "tokens-per-centre": tokens,
            "epochs": {n: tokens / train_tokens[n] for n in corpora},
            "pooled": {"wall": pooled["wall"], "compute": pooled["compute"], "bytes": pooled["bytes"],
                       "eval-in-run": pooled["eval"]},
            "solo": {n: {"compute": s["compute"], "wall": s["wall"]} for n, s in solos.items()},
            "matrix": matrix}


def _block_size(cfg: RunConfig) -> int:
    from models.config import MODEL_BLOCK_SIZES

    return MODEL_BLOCK_SIZES[cfg.model]


def _solo(name: str, data_dir: str, scratch: str, cfg: RunConfig, out: str) -> None:
    torch.set_num_threads(1)  # as each centre in the federation (threads = 1)
    trainer = CentreTrainer(name, Path(data_dir), Path(scratch), cfg)
    t0, compute = time.perf_counter(), 0.0
    for rnd in range(1, cfg.rounds + 1):  # no load_global: the centre keeps its own weights
        compute += trainer.train_round(rnd).metrics["compute-seconds"]
    state = {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items()}
    torch.save({"state": state, "compute": compute, "wall": time.perf_counter() - t0}, out)


def solo_runs(corpora: dict[str, Path], cfg: RunConfig, scratch: Path) -> dict[str, dict[str, Any]]:
    """Each centre alone, at most `cores` at a time (the machine's cores, as the federation had them)."""
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    names, out = list(corpora), {}
    width = max(1, min(len(names), os.cpu_count() or 1))
    for i in range(0, len(names), width):
        procs = {n: ctx.Process(target=_solo, args=(n, str(corpora[n]), str(scratch / n), cfg,
                                                    str(scratch / f"{n}.pt"))) for n in names[i:i + width]}
        for p in procs.values():
            p.start()
        for n, p in procs.items():
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"solo run of {n} exited with {p.exitcode}")
            out[n] = torch.load(scratch / f"{n}.pt", weights_only=True)
    return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------- report
def headline(b: dict[str, Any], centre: str) -> str:
    """"fr-genci: held-out loss 2.59 pooled against 2.62 alone (...)"."""
    pooled, alone = b["matrix"][POOLED][centre], b["matrix"][solo_name(centre)][centre]
    verdict = "pooling helps" if pooled < alone else "pooling does not help"
    return (f"{centre}: held-out loss {pooled:.2f} pooled against {alone:.2f} alone "
            f"({b['steps']} inner steps, {b['epochs'][centre]:.1f} passes over its own data; {verdict}, "
            f"{100 * (pooled / alone - 1):+.1f} %)")


def markdown(res: dict[str, Any], stem: str, heatmap: str) -> str:
    env, plan = res["environment"], res["plan"]
    centres = list(res["train-tokens"])
    lines = [f"# {stem}", "",
             f"Model `{plan['model']}`, {plan['centres']} centres ({', '.join(centres)}; one language each), corpus "
             f"of at most {plan['max_bytes']:,} bytes per centre (train tokens: "
             + ", ".join(f"{n} {t:,}" for n, t in res["train-tokens"].items()) + f"), H={plan['h']}, held-out loss "
             f"over {plan['eval_batches']} batches. Python {env['python']}, torch {env['torch']}, flwr {env['flwr']}, "
             f"{env['cores']} cores ({env['cpu']}), {env['date']}. Load average (1, 5, 15 min) before "
             f"{res['load']['before']}, after {res['load']['after']}: the machine was shared with other jobs, "
             "which slows the run but does not change the losses.", "",
             "**Solo** = the same model, the centre's own data only, the same inner optimiser, schedule and inner "
             "steps it gives the federation. **Pooled** = the federation's DiLoCo model after the same inner steps "
             "per centre. Both columns below are held-out loss on the centre's own validation split (lower is "
             "better). Compute is equal by construction (same steps, same batch, same model); the seconds are "
             "measured on the shared machine and move with its load (the solo runs go as many at a time as there "
             "are cores, the federation's centres all at once).", "", "## Headlines", ""]
    for b in res["budgets"]:
        lines += [f"- {headline(b, c)}" for c in centres]
    lines += ["", f"![cross-evaluation heat map]({heatmap})", ""]
    for b in res["budgets"]:
        rounds = f"{b['rounds']} round{'s' if b['rounds'] > 1 else ''}"
        lines += [f"## {b['steps']} inner steps per centre ({rounds} of H={plan['h']}, "
                  f"{b['tokens-per-centre']:,} tokens per centre)", "",
                  "| centre | passes over own data | solo loss | pooled loss | pooled vs solo | solo compute s "
                  "| its compute s in the federation (slowest centre) |", "|---|---|---|---|---|---|---|"]
        for c in centres:
            alone, pooled = b["matrix"][solo_name(c)][c], b["matrix"][POOLED][c]
            lines.append(f"| {c} | {b['epochs'][c]:.2f} | {alone:.3f} | {pooled:.3f} | "
                         f"{100 * (pooled / alone - 1):+.1f} % | {b['solo'][c]['compute']:.1f} | "
                         f"{b['pooled']['compute']:.1f} |")
        lines += ["", "Cross-evaluation (rows: model; columns: held-out split; held-out loss):", "",
                  "| model | " + " | ".join(centres) + " | mean |", "|---|" + "---|" * (len(centres) + 1)]
        for m, row in b["matrix"].items():
            vals = [row[c] for c in centres]
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
        lines += ["", f"Pooled run: {b['pooled']['wall']:.0f} s wall, {b['pooled']['bytes']:,} bytes moved (measured). "
                  "Its own end-of-run evaluation: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                 b["pooled"]["eval-in-run"].items()) + ".", ""]
    lines += ["## Reading it", "", *_reading(res), ""]
    return "\n".join(lines)


def _reading(res: dict[str, Any]) -> list[str]:
    """Where pooling helps and where it does not, from the figures (nothing asserted beyond them)."""
    out = []
    gaps = {}  # budget -> mean over centres of (pooled / solo - 1) on the centre's own split
    for b in res["budgets"]:
        centres = list(b["epochs"])
        won = [c for c in centres if b["matrix"][POOLED][c] < b["matrix"][solo_name(c)][c]]
        gaps[b["steps"]] = float(np.mean([b["matrix"][POOLED][c] / b["matrix"][solo_name(c)][c] - 1
                                          for c in centres]))
        other = {c: np.mean([b["matrix"][solo_name(c)][o] for o in centres if o != c]) for c in centres}
        pooled_other = {c: np.mean([b["matrix"][POOLED][o] for o in centres if o != c]) for c in centres}
        out.append(f"- At {b['steps']} inner steps per centre ({min(b['epochs'].values()):.2f}-"
                   f"{max(b['epochs'].values()):.2f} passes over each centre's own data), the pooled model beats "
                   f"the solo one on the centre's own held-out split for {len(won)} of {len(centres)} centres"
                   + (f" ({', '.join(won)})" if won else "") + f" (mean {100 * gaps[b['steps']]:+.1f} %). On the "
                   "other centres' splits (mean held-out loss): "
                   + ", ".join(f"{c}'s solo model {other[c]:.2f}" for c in centres) + "; the pooled model "
                   + ", ".join(f"{pooled_other[c]:.2f}" for c in centres) + " on the same splits.")
    if len(gaps) > 1:
        lo, hi = min(gaps), max(gaps)
        trend = "narrows" if gaps[hi] < gaps[lo] else "widens"
        out.append(f"- From {lo} to {hi} inner steps per centre the pooled model's difference on a centre's own "
                   f"split {trend}: {100 * gaps[lo]:+.1f} % to {100 * gaps[hi]:+.1f} %.")
    out.append("- " + " ".join([
        "The expected reason, and what would change it: at equal inner steps per centre a solo model spends every",
        "step on its own language, while the pooled model spreads the same steps over every member's; a small",
        "model has little capacity to share. Pooling pays on a centre's own split once its compute exceeds what",
        "its own data can feed: after several passes a solo model repeats its text and overfits, and the pooled",
        "model keeps seeing new text from the other members. The passes column above says how far each budget",
        "is from that point; these runs measure only this small model at these budgets."]))
    return out


def heatmap(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = res["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.2 * len(budgets), 4.2), squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=True):
        models, centres = list(b["matrix"]), list(b["epochs"])
        grid = np.array([[b["matrix"][m][c] for c in centres] for m in models])
        im = ax.imshow(grid, cmap="viridis_r")
        ax.set_xticks(range(len(centres)), centres, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        for i in range(len(models)):
            for j in range(len(centres)):
                light = grid[i, j] < (grid.min() + grid.max()) / 2  # viridis_r: low losses are light
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="k" if light else "w", fontsize=8)
        ax.set_xlabel("held-out split")
        ax.set_title(f"{b['steps']} inner steps per centre", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8, label="held-out loss (lower is better)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_outputs(res: dict[str, Any], out: Path, stem: str) -> list[Path]:
    import json

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}_heatmap.png"]
    paths[0].write_text(json.dumps(res, indent=1, default=str))
    heatmap(res, paths[2])
    paths[1].write_text(markdown(res, stem, paths[2].name))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bridgepool bench --pooling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (the smoke test)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="", help="file name stem; default pooling_<hardware>_<date>")
    args = p.parse_args(argv)
    res = run_all(QUICK if args.quick else FULL)
    stem = args.tag or f"pooling_{federation._hardware()}_{time.strftime('%Y-%m-%d')}"
    for path in write_outputs(res, args.out, stem):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
