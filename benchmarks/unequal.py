"""Centres of unequal speed: fixed H against time-budgeted rounds (round-seconds), side by side.

    bridgepool bench --unequal                     # small model, 3 centres, one 3x slower (~8 min on 2 cores)
    bridgepool bench --unequal --fast-speed 1      # the fast centres at full speed (saturates 2 cores)
    bridgepool bench --unequal --quick             # tiny model, 2 rounds: the smoke test

Three centres on one machine, the third emulated 3x slower than the other two (`speed`: after
each inner step a centre sleeps (1/speed - 1) x that step's time, clients/training.py; a
documented emulation, not a CPU share: on 2 shared cores a cgroup cap would also slow the
others). By default the two fast centres run at speed 1/2 and the slow one at 1/6: their
combined demand (~1.2 cores) then fits the 2 shared cores, so that the rows measure who waits
for whom, as on centres with hardware of their own, and not the machine's saturation (with
`--fast-speed 1` the time-budgeted row makes three centres compete for 2 cores, each step of a
fast centre slows down, and the comparison charges that to the budget). Two rows, one after
the other in the same run:

- fixed H: every centre takes `inner-steps` per round; a round lasts as long as the slow centre.
- time budget: `round-seconds` = the slow centre's mean compute per round in the fixed-H row, so
  the rounds last about as long (the same number of rounds, the same wall clock); each centre
  trains until its round's compute reaches it, the fast ones taking ~3x the steps.

Per row: the federation's tokens/s (accepted tokens over the rounds' span), each centre's idle
fraction (round wall less its own compute and evaluation, over the round wall, mean of rounds),
steps per round, and each centre's held-out loss at equal wall time: of the model after the
last round each row had finished within the shorter row's span (each round's evaluation is of
the model it was sent, so the loss after round r is round r + 1's, or the final evaluation's).

Writes OUT/STEM.json and OUT/STEM.md (default benchmarks/results/unequal_<hardware>_<date>).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.federation import centre_copies
from clients.data import DEFAULT_CENTRES, prepare_centre
from deploy.local import LocalFederation
from deploy.processes import free_base_port
from models.config import RunConfig, load_defaults

FULL = {"model": "small", "rounds": 6, "inner-steps": 10, "batch-size": 4, "seq-len": 128, "eval-batches": 4,
        "inner-warmup-steps": 6, "inner-lr": 3e-3}
QUICK = {**FULL, "model": "tiny", "rounds": 2, "inner-steps": 6, "seq-len": 32, "eval-batches": 2,
         "inner-warmup-steps": 2}
FAST_SPEED = 1 / 2  # the two fast centres (see the docstring)
SLOW_FACTOR = 3  # the slow centre's steps take this x as long as the fast ones'
TARGET_TOKENS_RATIO = 1.5


def federate(corpora: dict[str, Path], work: Path, name: str, over: dict[str, Any],
             fast: float) -> dict[str, Any]:
    """One federation over the Deployment Engine, the last centre SLOW_FACTOR x slower; its run.json."""
    run_dir = work / name
    centres = [dataclasses.replace(c, speed=fast) for c in centre_copies(run_dir, corpora)]
    centres[-1] = dataclasses.replace(centres[-1], speed=fast / SLOW_FACTOR)
    values = {**load_defaults(), "expected-centres": len(centres), "threads": 1, "compression": "none",
              "round-timeout": 1800.0, "run-dir": str(run_dir), "run-name": run_dir.name, **over}
    cfg = RunConfig.from_mapping(values)
    with LocalFederation(run_dir, centres, base_port=free_base_port(2 + len(centres))) as fed:
        run = fed.wait(fed.submit(cfg.to_mapping()), timeout=3 * 3600)
    if run.get("status") != "finished":
        raise RuntimeError(f"{name}: {run.get('message')}")
    return run


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """The row's figures, from its run.json alone."""
    rounds = run["rounds"]
    span = rounds[-1]["time"] - (rounds[0]["time"] - rounds[0]["wall-seconds"])
    names = sorted(rounds[0]["centres"])
    per: dict[str, Any] = {}
    for c in names:
        walls = [r["wall-seconds"] for r in rounds]
        per[c] = {
            "steps-per-round": [r["centres"][c].get("inner-steps", 0.0) for r in rounds],
            "tokens": sum(r["centres"][c]["tokens"] for r in rounds),
            "compute-seconds-mean": sum(r["centres"][c]["compute-seconds"] for r in rounds) / len(rounds),
            "idle-fraction": sum(r["idle-seconds"][c] / w for r, w in zip(rounds, walls, strict=True)) / len(rounds),
            "eval-loss-final": run["final"]["centres"][c]["eval-loss"],
        }
    start = rounds[0]["time"] - rounds[0]["wall-seconds"]
    after = [r["centres"] for r in rounds[1:]] + [run["final"]["centres"]]  # evaluations of each round's model
    losses = [[r["time"] - start, {c: a[c]["eval-loss"] for c in names if c in a}]
              for r, a in zip(rounds, after, strict=True)]
    return {"wall-seconds": span, "round-seconds": [r["wall-seconds"] for r in rounds], "loss-after-round": losses,
            "tokens": sum(r["tokens"] for r in rounds), "tokens-per-second": sum(r["tokens"] for r in rounds) / span,
            "eval-loss-mean": run["final"]["eval-loss-mean"], "centres": per}


def at_equal_wall(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per row: (seconds, round, per-centre held-out loss) of the last model it had by the shorter row's span."""
    limit = min(f["wall-seconds"] for f in rows.values())
    out = {}
    for label, f in rows.items():
        done = [(i + 1, s, loss) for i, (s, loss) in enumerate(f["loss-after-round"]) if s <= limit * 1.001]
        rnd, seconds, loss = done[-1] if done else (0, 0.0, {})
        out[label] = {"seconds": seconds, "round": rnd, "eval-loss": loss}
    return {"limit-seconds": limit, "rows": out}


def run_all(plan: dict[str, Any], fast: float = FAST_SPEED) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bridgepool-unequal-"))
    try:
        corpora: dict[str, Path] = {}
        for name, source in DEFAULT_CENTRES[:3]:
            corpora[name] = work / "corpora" / name
            prepare_centre(source, corpora[name], max_bytes=400_000)
        slow = list(corpora)[-1]
        t0 = os.getloadavg()
        fixed = figures(federate(corpora, work, "fixed", plan, fast))
        print(f"fixed H: {fixed['tokens-per-second']:.0f} tokens/s", flush=True)
        budget_s = fixed["centres"][slow]["compute-seconds-mean"]
        over = {**plan, "round-seconds": round(budget_s, 2), "min-inner-steps": 1,
                "max-inner-steps": 10 * plan["inner-steps"]}
        budget = figures(federate(corpora, work, "budget", over, fast))
        print(f"time budget {over['round-seconds']} s: {budget['tokens-per-second']:.0f} tokens/s", flush=True)
        rows = {"fixed H": fixed, f"time budget {over['round-seconds']} s": budget}
        return {"plan": plan, "slow-centre": slow, "fast-speed": fast, "slow-speed": fast / SLOW_FACTOR,
                "budget-plan": over, "load-before": t0, "load-after": os.getloadavg(), "rows": rows,
                "equal-wall": at_equal_wall(rows)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(res: dict[str, Any]) -> str:
    plan, rows = res["plan"], res["rows"]
    names = list(next(iter(rows.values()))["centres"])
    lines = ["# Centres of unequal speed: fixed H against time-budgeted rounds", "",
             f"Plan: {json.dumps(plan)}; 3 centres on one machine (threads = 1 each), emulated speeds (after each "
             "step a centre sleeps (1/speed - 1) x that step's time): the fast ones at "
             f"{res['fast-speed']:.3g}, `{res['slow-centre']}` at {res['slow-speed']:.3g}, {SLOW_FACTOR}x slower. "
             "The budget row sets round-seconds to the slow centre's mean compute per round in the fixed-H "
             f"row ({res['budget-plan']['round-seconds']} s), min-inner-steps 1, max-inner-steps "
             f"{res['budget-plan']['max-inner-steps']}. Load average (1, 5, 15 min) before: "
             f"{', '.join(f'{x:.2f}' for x in res['load-before'])}; after: "
             f"{', '.join(f'{x:.2f}' for x in res['load-after'])} (a 2-core machine shared with other jobs).", "",
             "| row | wall s | rounds s | federation tokens/s | " + " | ".join(
                 f"{c} steps/round, idle, final held-out loss" for c in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for label, f in rows.items():
        cells = []
        for c in names:
            m = f["centres"][c]
            steps = m["steps-per-round"]
            cells.append(f"{min(steps):.0f}-{max(steps):.0f}, {100 * m['idle-fraction']:.0f} %, "
                         f"{m['eval-loss-final']:.4f}")
        lines.append(f"| {label} | {f['wall-seconds']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in f['round-seconds'])} | {f['tokens-per-second']:.0f} | "
                     + " | ".join(cells) + " |")
    eq = res["equal-wall"]
    lines += ["", "Idle = the round's wall less the centre's own compute and evaluation (waiting for the others, "
              "the transfers and the aggregation), mean over rounds of its fraction of the round. Final held-out "
              "loss: each centre's validation split on the final model (same rounds).", "",
              f"## Held-out loss at equal wall time ({eq['limit-seconds']:.0f} s, the shorter row's span)", "",
              "| row | model after round (at s) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for label, e in eq["rows"].items():
        lines.append(f"| {label} | {e['round']} ({e['seconds']:.0f} s) | "
                     + " | ".join(f"{e['eval-loss'].get(c, float('nan')):.4f}" for c in names) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"- **{v}**: {t}" for v, t in targets(res)]
    return "\n".join(lines) + "\n"


def targets(res: dict[str, Any]) -> list[tuple[str, str]]:
    fixed, budget = list(res["rows"].values())
    ratio = budget["tokens-per-second"] / fixed["tokens-per-second"]
    out = [("met" if ratio >= TARGET_TOKENS_RATIO else "missed",
            f"federation tokens/s >= 1.5x the fixed-H row: x{ratio:.2f} "
            f"({budget['tokens-per-second']:.0f} against {fixed['tokens-per-second']:.0f})")]
    eq = res.get("equal-wall") or at_equal_wall(res["rows"])
    a, b = (e["eval-loss"] for e in eq["rows"].values())
    worse = [c for c in fixed["centres"] if not b.get(c, float("inf")) <= a.get(c, float("inf"))]
    out.append(("met" if not worse else "missed",
                f"held-out loss no worse at equal wall time ({eq['limit-seconds']:.0f} s): "
                + ", ".join(f"{c} {a.get(c, float('nan')):.4f} -> {b.get(c, float('nan')):.4f}"
                            for c in fixed["centres"])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bridgepool bench --unequal", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, 2 rounds (the smoke test)")
    p.add_argument("--fast-speed", type=float, default=FAST_SPEED,
                   help=f"the fast centres' emulated speed (default {FAST_SPEED}; the slow one: this / {SLOW_FACTOR})")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="", help="file name stem; default unequal_<hardware>_<date>")
    args = p.parse_args(argv)
    if not 0 < args.fast_speed <= 1:
        p.error(f"--fast-speed must be in (0, 1], got {args.fast_speed}")
    res = run_all(QUICK if args.quick else FULL, args.fast_speed)
    from benchmarks.federation import save_results

    print(save_results(res, args.out, "unequal", args.tag, report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
