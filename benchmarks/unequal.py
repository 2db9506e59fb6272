"""Centres of unequal speed: fixed H against time-budgeted rounds (round-seconds), side by side.

    bridgepool bench --unequal             # small model, 3 centres, one 3x slower (~5 min on 2 cores)
    bridgepool bench --unequal --quick     # tiny model, 2 rounds: the smoke test

Three centres on one machine, the third emulated 3x slower (`speed = 1/3`: after each inner
step it sleeps twice that step's time, clients/training.py; a documented emulation, not a CPU
share: on 2 shared cores a cgroup cap would also slow the others). Two rows, one after the
other in the same run:

- fixed H: every centre takes `inner-steps` per round; a round lasts as long as the slow centre.
- time budget: `round-seconds` = the slow centre's mean compute per round in the fixed-H row, so
  the rounds last about as long (the same number of rounds, the same wall clock); each centre
  trains until its round's compute reaches it, the fast ones taking ~3x the steps.

Per row: the federation's tokens/s (accepted tokens over the rounds' span), each centre's idle
fraction (round wall less its own compute and evaluation, over the round wall, mean of rounds),
steps per round, and each centre's held-out loss of the final model (same rounds, ~same wall).

Writes OUT/STEM.json and OUT/STEM.md (default benchmarks/results/unequal_<hardware>_<date>).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.federation import centre_copies
from clients.data import DEFAULT_CENTRES, prepare_centre
from deploy.local import LocalFederation
from deploy.processes import free_base_port
from models.config import RunConfig, load_defaults

FULL = {"model": "small", "rounds": 8, "inner-steps": 12, "batch-size": 4, "seq-len": 128, "eval-batches": 4,
        "inner-warmup-steps": 6, "inner-lr": 3e-3}
QUICK = {**FULL, "model": "tiny", "rounds": 2, "inner-steps": 6, "seq-len": 32, "eval-batches": 2,
         "inner-warmup-steps": 2}
SLOW_SPEED = 1 / 3
TARGET_TOKENS_RATIO = 1.5


def federate(corpora: dict[str, Path], work: Path, name: str, over: dict[str, Any]) -> dict[str, Any]:
    """One federation over the Deployment Engine, the last centre at SLOW_SPEED; its run.json."""
    run_dir = work / name
    centres = centre_copies(run_dir, corpora)
    centres[-1] = dataclasses.replace(centres[-1], speed=SLOW_SPEED)
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
    return {"wall-seconds": span, "round-seconds": [r["wall-seconds"] for r in rounds],
            "tokens": sum(r["tokens"] for r in rounds), "tokens-per-second": sum(r["tokens"] for r in rounds) / span,
            "eval-loss-mean": run["final"]["eval-loss-mean"], "centres": per}


def run_all(plan: dict[str, Any]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bridgepool-unequal-"))
    try:
        corpora: dict[str, Path] = {}
        for name, source in DEFAULT_CENTRES[:3]:
            corpora[name] = work / "corpora" / name
            prepare_centre(source, corpora[name], max_bytes=400_000)
        slow = list(corpora)[-1]
        t0 = os.getloadavg()
        fixed = figures(federate(corpora, work, "fixed", plan))
        print(f"fixed H: {fixed['tokens-per-second']:.0f} tokens/s", flush=True)
        budget_s = fixed["centres"][slow]["compute-seconds-mean"]
        over = {**plan, "round-seconds": round(budget_s, 2), "min-inner-steps": 1,
                "max-inner-steps": 10 * plan["inner-steps"]}
        budget = figures(federate(corpora, work, "budget", over))
        print(f"time budget {over['round-seconds']} s: {budget['tokens-per-second']:.0f} tokens/s", flush=True)
        return {"plan": plan, "slow-centre": slow, "slow-speed": SLOW_SPEED, "budget-plan": over,
                "load-before": t0, "load-after": os.getloadavg(),
                "rows": {"fixed H": fixed, f"time budget {over['round-seconds']} s": budget}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(res: dict[str, Any]) -> str:
    plan, rows = res["plan"], res["rows"]
    names = list(next(iter(rows.values()))["centres"])
    lines = ["# Centres of unequal speed: fixed H against time-budgeted rounds", "",
             f"Plan: {json.dumps(plan)}; 3 centres on one machine (threads = 1 each), `{res['slow-centre']}` "
             f"emulated {1 / res['slow-speed']:.0f}x slower (speed = 1/3: it sleeps twice each step's time after "
             "it). The budget row sets round-seconds to the slow centre's mean compute per round in the fixed-H "
             f"row ({res['budget-plan']['round-seconds']} s), min-inner-steps 1, max-inner-steps "
             f"{res['budget-plan']['max-inner-steps']}. Load average (1, 5, 15 min) before: "
             f"{', '.join(f'{x:.2f}' for x in res['load-before'])}; after: "
             f"{', '.join(f'{x:.2f}' for x in res['load-after'])} (a 2-core machine shared with other jobs).", "",
             "| row | wall s | rounds s | federation tokens/s | " + " | ".join(
                 f"{c} steps/round, idle, held-out loss" for c in names) + " |",
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
    lines += ["", "Idle = the round's wall less the centre's own compute and evaluation (waiting for the others, "
              "the transfers and the aggregation), mean over rounds of its fraction of the round. Held-out loss: "
              "each centre's validation split on the final model (same rounds, about the same wall clock).", "",
              "## Targets", ""]
    lines += [f"- **{v}**: {t}" for v, t in targets(res)]
    return "\n".join(lines) + "\n"


def targets(res: dict[str, Any]) -> list[tuple[str, str]]:
    fixed, budget = list(res["rows"].values())
    ratio = budget["tokens-per-second"] / fixed["tokens-per-second"]
    out = [("met" if ratio >= TARGET_TOKENS_RATIO else "missed",
            f"federation tokens/s >= 1.5x the fixed-H row: x{ratio:.2f} "
            f"({budget['tokens-per-second']:.0f} against {fixed['tokens-per-second']:.0f})")]
    worse = [c for c in fixed["centres"]
             if budget["centres"][c]["eval-loss-final"] > fixed["centres"][c]["eval-loss-final"]]
    out.append(("met" if not worse else "missed",
                "held-out loss no worse at ~equal wall time (walls "
                f"{fixed['wall-seconds']:.0f} s and {budget['wall-seconds']:.0f} s): " + ", ".join(
                    f"{c} {fixed['centres'][c]['eval-loss-final']:.4f} -> {budget['centres'][c]['eval-loss-final']:.4f}"
                    for c in fixed["centres"])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bridgepool bench --unequal", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, 2 rounds (the smoke test)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="", help="file name stem; default unequal_<hardware>_<date>")
    args = p.parse_args(argv)
    res = run_all(QUICK if args.quick else FULL)
    from benchmarks.federation import _environment, _hardware

    res["environment"] = _environment()
    stem = args.tag or f"unequal_{_hardware()}_{time.strftime('%Y-%m-%d')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{stem}.md").write_text(report(res))
    print(args.out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
