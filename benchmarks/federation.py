"""What federation costs: centralised vs all-reduce vs Flower (FedAvg, DiLoCo at
several H) vs each centre's bare local loop, on one machine, same model, same
data, same token budget per centre. Also the federation's fixed cost per round.

    bridgepool bench                       # the committed configuration (~15 min on 2 cores)
    bridgepool bench --quick --out DIR     # toy size, every scenario (the smoke test)
    bridgepool bench --pooling             # each centre alone against the pooled model (benchmarks/pooling.py)
    python -m benchmarks.federation ...    # the same

Writes OUT/federation.json, OUT/federation.md and OUT/federation_*.png.
Bytes are measured, not computed from sizes: for Flower, the traffic the
SuperLink counted on its Fleet API (centres <-> coordinator, `flwr ls`); for DDP,
the loopback interface of a network namespace holding only the DDP processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import baselines, cpushare
from benchmarks.report import DEMO_LOCAL_ROW, SEPARATE, write_outputs
from clients.data import DEFAULT_CENTRES, prepare_centre
from deploy.local import Centre, LocalFederation, centre_dirs
from deploy.processes import free_base_port
from models.config import RunConfig, load_defaults


@dataclass
class Plan:
    model: str
    centres: int
    steps: int  # inner steps per centre over the whole run (the token budget)
    hs: tuple[int, ...]
    max_bytes: int
    fixed_rounds: int
    dp_clip: float = 10.0  # L2 clip of each centre's pseudo-gradient in the DP row
    demo_h: int = 0  # the demo's default H: a utilisation row at it (0 = none)
    demo_rounds: int = 0  # ... and its default rounds
    overlap: int = 0  # overlap-steps for the demo rows with overlap (0 = no such rows)


_DEFAULTS = load_defaults()
# What the separate-machine rows leave the coordinator (SuperLink, ServerApp) on this machine:
# ~0.85 CPU-s per round boundary with 2 centres here, mostly between the centres' rounds.
COORDINATOR_CORES = 0.4


FULL = Plan(model="small", centres=2, steps=200, hs=(10, 50, 200), max_bytes=1_500_000, fixed_rounds=5,
            demo_h=int(_DEFAULTS["inner-steps"]), demo_rounds=int(_DEFAULTS["rounds"]), overlap=16)
QUICK = Plan(model="tiny", centres=2, steps=8, hs=(4, 8), max_bytes=60_000, fixed_rounds=2, dp_clip=1.0,
             demo_h=4, demo_rounds=2, overlap=2)


def run_config(plan: Plan, run_dir: Path, **over: Any) -> RunConfig:
    # Every row but the demo's: fp32 both ways, no overlap, whatever the demo's defaults are.
    values = {**_DEFAULTS, "model": plan.model, "expected-centres": plan.centres, "compression": "none",
              "overlap-steps": 0, "rounds": 1, "inner-steps": plan.steps, "threads": 1, "eval-batches": 8,
              "run-dir": str(run_dir), "run-name": run_dir.name, **over}
    return RunConfig.from_mapping(values)


class _CappedFederation(LocalFederation):
    """Each centre's processes (worker, SuperNode and the runtime it starts) in its capped
    cgroup (benchmarks/cpushare.py); the coordinator's outside, on the rest of the machine."""

    def __init__(self, *args: Any, shares: cpushare.CpuShares, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shares = shares

    def _wrap(self, where: str, argv: list[str]) -> list[str]:
        group = self.shares.groups.get(where)
        return super()._wrap(where, argv if group is None else cpushare.in_group(group, argv))


def span(rounds: list[dict[str, Any]]) -> tuple[float, float]:
    """From round 1's push to the last round's end (as time.time()): the training span, start-up excluded."""
    return rounds[0]["time"] - rounds[0]["wall-seconds"], rounds[-1]["time"]


def flower(plan: Plan, corpora: dict[str, Path], work: Path, name: str, warm: bool = True,
           shares: cpushare.CpuShares | None = None, **over: Any) -> dict[str, Any]:
    """One scenario over the Deployment Engine; `warm=False`: stock `flower-supernode` (a new
    ClientApp process per message, Flower's own 3 s idle pull), for the fixed-cost comparison;
    `shares`: each centre on its own CPU share, the coordinator outside (separate machines)."""
    run_dir = work / name
    centres = centre_copies(run_dir, corpora)
    cfg = run_config(plan, run_dir, **over)
    kw: dict[str, Any] = {"base_port": _free_port(), "warm_supernodes": warm}
    fed = LocalFederation(run_dir, centres, **kw) if shares is None else \
        _CappedFederation(run_dir, centres, shares=shares, **kw)
    with fed:
        t0 = time.perf_counter()
        run = fed.wait(fed.submit(cfg.to_mapping()))
        wall = time.perf_counter() - t0
        traffic = fed.fleet_traffic()  # counted by the SuperLink on its Fleet API
    # The weights travel on the data plane by default (server/dataplane.py): its socket counts, too.
    plane = run.get("final", {}).get("data-plane") or {}
    traffic = {"inbound": traffic["inbound"] + plane.get("bytes-received", 0),
               "outbound": traffic["outbound"] + plane.get("bytes-served", 0)}
    moved = traffic["inbound"] + traffic["outbound"]
    if run.get("status") != "finished":
        raise RuntimeError(f"{name}: {run.get('message')}")
    rounds = run["rounds"]
    # Per centre, its training seconds over the run; the busiest centre bounds the pooled rate.
    # (With overlap-steps a round's first steps run during the previous round's aggregation,
    # so the sum of per-round maxima would count across centres, not time.)
    per_centre: dict[str, float] = {}
    for r in rounds:
        for centre, m in r["centres"].items():
            per_centre[centre] = per_centre.get(centre, 0.0) + m.get("compute-seconds", 0.0)
    compute = max(per_centre.values())
    start, end = span(rounds)
    round_wall = end - start
    return {"wall": wall, "round-wall": round_wall,
            "bytes-source": "SuperLink Fleet API (flwr ls)" + (" + data plane sockets" if plane else ""),
            "bytes-up": traffic["inbound"], "bytes-down": traffic["outbound"], "compute": compute,
            "tokens": sum(r["tokens"] for r in rounds), "bytes": moved, "rounds": len(rounds),
            "payload-bytes": sum(r["bytes-sent"] + r["bytes-received"] for r in rounds),
            "overhead-per-round": (round_wall - compute) / len(rounds),
            # Without round 1 (bundle install, model build, first data reads on every centre).
            "overhead-steady": (sum(r["wall-seconds"] - max(m["compute-seconds"] for m in r["centres"].values())
                                    for r in rounds[1:]) / (len(rounds) - 1)) if len(rounds) > 1 else None,
            "eval": {k: v["eval-loss"] for k, v in run["final"]["centres"].items()},
            "overlap-steps": cfg.overlap_steps, "compression": cfg.compression,
            "steps-ahead": sum(m.get("steps-ahead", 0.0) for r in rounds for m in r["centres"].values()),
            "dp": rounds[-1].get("dp"),  # epsilon after the last round, when DP is on
            "curve": [(sum(x["tokens"] for x in rounds[:i]), r["eval-loss-mean"], r["time"] - run["started"])
                      for i, r in enumerate(rounds)]
            + [(sum(x["tokens"] for x in rounds), run["final"]["eval-loss-mean"], run["finished"] - run["started"])]}


def centre_copies(run_dir: Path, corpora: dict[str, Path]) -> list[Centre]:
    """Each centre's own copy of its prepared corpus under `run_dir` (deploy/local.py's layout)."""
    centres = []
    for cname, path in corpora.items():
        c = centre_dirs(run_dir, cname)
        shutil.copytree(path, c.data_dir)
        centres.append(c)
    return centres


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--wire" in argv:  # the data plane against Flower's messages (benchmarks/wire.py)
        from benchmarks.wire import main as wire_main

        return wire_main([a for a in argv if a != "--wire"])
    if "--pooling" in argv:  # each centre alone against the pooled model (benchmarks/pooling.py)
        from benchmarks.pooling import main as pooling_main

        return pooling_main([a for a in argv if a != "--pooling"])
    if "--ranks" in argv:  # one centre on 1 and 2 data-parallel ranks (benchmarks/ranks.py)
        from benchmarks.ranks import main as ranks_main

        return ranks_main([a for a in argv if a != "--ranks"])
    if "--unequal" in argv:  # centres of unequal speed: fixed H against a time budget (benchmarks/unequal.py)
        from benchmarks.unequal import main as unequal_main

        return unequal_main([a for a in argv if a != "--unequal"])
    p = argparse.ArgumentParser(prog="bridgepool bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--wire", action="store_true",
                   help="instead: the data-plane benchmark (benchmarks/wire.py; with --ratio also base at H=20 "
                        "against its bare loop)")
    p.add_argument("--pooling", action="store_true",
                   help="instead: each centre alone against the pooled model (benchmarks/pooling.py)")
    p.add_argument("--ranks", action="store_true",
                   help="instead: one centre on 1 and 2 data-parallel ranks (benchmarks/ranks.py)")
    p.add_argument("--unequal", action="store_true",
                   help="instead: unequal centres, fixed H against round-seconds (benchmarks/unequal.py)")
    p.add_argument("--quick", action="store_true", help="toy sizes (the smoke test)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="", help="file name stem; default federation_cpu-<cores>core_<date>")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    results = run_all(plan)
    stem = args.tag or f"federation_{_hardware()}_{time.strftime('%Y-%m-%d')}"
    for path in write_outputs(results, args.out, stem):
        print(path)
    return 0


DEMO_ROW = "DiLoCo H={h} (demo default)"
OVERLAP_ROW = "DiLoCo H={h} overlap {k}"  # the demo's configuration with overlap-steps = k


def run_all(plan: Plan) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bridgepool-bench-"))
    try:
        corpora: dict[str, Path] = {}
        for name, source in DEFAULT_CENTRES[: plan.centres]:
            corpora[name] = work / "corpora" / name
            prepare_centre(source, corpora[name], max_bytes=plan.max_bytes)
        scen: dict[str, dict[str, Any]] = _Progress()
        base_cfg = run_config(plan, work / "base")
        scen["local loop (no federation)"] = baselines.local_loop(corpora, base_cfg, work)
        for name, fn in (("centralised", lambda: baselines.centralised(corpora, base_cfg, plan.steps, 2)),
                         ("all-reduce (DDP gloo)", lambda: baselines.all_reduce(corpora, base_cfg, plan.steps, work))):
            res = fn()
            res["eval"] = baselines.evaluate_state(res.pop("state"), corpora, base_cfg, work / "eval")
            res["rounds"] = plan.steps  # one synchronisation per step
            scen[name] = res
        for h in plan.hs:
            scen[f"DiLoCo H={h}"] = flower(plan, corpora, work, f"diloco-h{h}", rounds=plan.steps // h,
                                            **{"inner-steps": h, "strategy": "diloco"})
        separate: dict[str, Any] | None = None
        if plan.demo_h:  # the utilisation target is stated for the demo's default configuration
            demo = {k: _DEFAULTS[k] for k in ("strategy", "compression", "overlap-steps")}
            demo = {**demo, "inner-steps": plan.demo_h, "overlap-steps": min(plan.demo_h, int(demo["overlap-steps"]))}
            # Its reference: the same centres' bare loop for the same rounds and steps (a 200-step
            # loop would count its first, slower steps against more of its run than the demo's).
            demo_base = run_config(plan, work / "base-demo", rounds=plan.demo_rounds, **{"inner-steps": plan.demo_h})
            _demo_scenarios(plan, corpora, work, demo_base, demo, scen)
            separate = _separate_machines(plan, corpora, work, demo_base, demo, scen)
        mid = plan.hs[len(plan.hs) // 2]
        scen[f"DiLoCo H={mid} int8"] = flower(plan, corpora, work, f"diloco-h{mid}-int8", rounds=plan.steps // mid,
                                              **{"inner-steps": mid, "strategy": "diloco", "compression": "int8"})
        scen[f"FedAvg H={mid}"] = flower(plan, corpora, work, f"fedavg-h{mid}", rounds=plan.steps // mid,
                                         **{"inner-steps": mid, "strategy": "fedavg"})
        # Centre-level DP (server/privacy.py): clip ~ the measured pseudo-gradient norm at H=50
        # (8-17 for the small model), noise multiplier 1. Its epsilon is in the row's "dp".
        scen[f"DiLoCo H={mid} DP"] = flower(plan, corpora, work, f"diloco-h{mid}-dp", rounds=plan.steps // mid,
                                            **{"inner-steps": mid, "strategy": "diloco", "dp-clip": plan.dp_clip,
                                               "dp-noise-multiplier": 1.0})
        trivial = {"rounds": plan.fixed_rounds, "model": "tiny", "inner-steps": 1, "batch-size": 1, "eval-batches": 1}
        fixed = flower(plan, corpora, work, "fixed-cost", **trivial)
        fixed_stock = flower(plan, corpora, work, "fixed-cost-stock", warm=False, **trivial)
        return {"plan": plan.__dict__, "scenarios": scen, "fixed-cost": fixed, "fixed-cost-stock": fixed_stock,
                "separate-machines": separate, "environment": _environment()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _separate_machines(plan: Plan, corpora: dict[str, Path], work: Path, demo_base: RunConfig,
                       demo: dict[str, Any], scen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The demo rows again with each centre on a CPU share of its own and the coordinator
    outside (benchmarks/cpushare.py), with their reference loop on the same shares."""
    cores = min(1.0, ((os.cpu_count() or 1) - COORDINATOR_CORES) / plan.centres)
    why = cpushare.unavailable() or (None if cores > 0 else f"{os.cpu_count()} cores leave none to the centres")
    if why:
        print(f"separate-machine rows not run: {why}", flush=True)
        return {"cores": cores, "not-run": why}
    shares = cpushare.create(list(corpora), cores)
    try:
        _demo_scenarios(plan, corpora, work, demo_base, demo, scen, shares)
    finally:
        shares.remove()
    return {"cores": cores}


def _demo_scenarios(plan: Plan, corpora: dict[str, Path], work: Path, demo_base: RunConfig, demo: dict[str, Any],
                    scen: dict[str, dict[str, Any]], shares: cpushare.CpuShares | None = None) -> None:
    """The demo's configuration, its reference loop and (plan.overlap) the optional overlap: what it
    buys, all else equal, and with int8 too. With `shares`, every centre on its own CPU share (the
    rows named with SEPARATE; no int8 row there: it adds nothing to the topology question)."""
    tail, tag = ("", "") if shares is None else (SEPARATE.format(cores=shares.cores), "-separate")
    scen[DEMO_LOCAL_ROW + tail] = baselines.local_loop(corpora, demo_base, work / f"local-demo{tag}", shares)
    scen[DEMO_ROW.format(h=plan.demo_h) + tail] = flower(plan, corpora, work, f"demo{tag}", shares=shares,
                                                         rounds=plan.demo_rounds, **demo)
    if plan.overlap:
        row = OVERLAP_ROW.format(h=plan.demo_h, k=plan.overlap)
        scen[row + tail] = flower(plan, corpora, work, f"demo-overlap{tag}", shares=shares, rounds=plan.demo_rounds,
                                  **{**demo, "overlap-steps": plan.overlap, "compression": "none"})
        if shares is None:
            scen[f"{row} int8"] = flower(plan, corpora, work, "demo-overlap-int8", rounds=plan.demo_rounds,
                                         **{**demo, "overlap-steps": plan.overlap, "compression": "int8"})


class _Progress(dict):
    """The scenarios dict, printing a line as each scenario finishes (live progress)."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.monotonic()

    def __setitem__(self, name: str, res: dict[str, Any]) -> None:
        super().__setitem__(name, res)
        rate = res["tokens"] / res.get("round-wall", res["wall"])
        print(f"[{time.monotonic() - self.t0:7.1f}s] {name}: {res['tokens']:,} tokens, {rate:,.0f} tokens/s, "
              f"{res['bytes']:,} bytes", flush=True)


def _free_port() -> int:
    return free_base_port(8)


def save_results(res: dict[str, Any], out: Path, kind: str, tag: str, render: Callable[[dict[str, Any]], str]) -> Path:
    """A benchmark's JSON (with this machine's environment) and its Markdown report, named `tag` or
    KIND_<hardware>_<date>; returns the report's path."""
    res["environment"] = _environment()
    stem = tag or f"{kind}_{_hardware()}_{time.strftime('%Y-%m-%d')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(render(res))
    return out / f"{stem}.md"


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def _environment() -> dict[str, Any]:
    import flwr

    return {"python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DEMO_LOCAL_ROW", "DEMO_ROW", "FULL", "OVERLAP_ROW", "QUICK", "Plan", "main", "run_all"]
