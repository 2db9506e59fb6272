"""Model updates at link speed: the data plane against Flower's own messages, side by side.

    bridgepool bench --wire                 # base model (127M), 2 centres (~20 min on 2 cores)
    bridgepool bench --wire --quick         # tiny model, the smoke test
    bridgepool bench --wire --ratio         # also the real-size ratio: base at H=20 (and H=40) against its bare loop

Wire scenario: the same federation (2 centres, H=1, batch 1 x 64 tokens, 1 eval batch: minimal
compute, one checkpoint at the end, so rounds 2-4 are the steady rounds measured) once with
`data-plane = "stream"` and once with `"flower"`, one after the other in the same run; then the
stream once more with a checkpoint each round (the default cadence), to show what that disk traffic
costs the wire. Per steady round (round 1 carries no weights: the centres build the seed's model),
the time the weights took is what is left of the round's wall time after the slowest centre's compute and
evaluation, the aggregation (with the screening of the updates, on the data plane the same read of
each update as the sum) and the checkpoint; the effective throughput is the model bytes the round
moved (the global model to each centre, each centre's update back) over that time. Peak resident
memory: each centre worker's (its own getrusage, reported with its metrics) and the ServerApp's.

Ratio scenario (`--ratio`): base at H=20, B=1x64 (~30 s of compute per round on the CPU issue 13 was
written on, the ratio of a GPU round of a 1B model; ~15 s on this faster one), federated tokens/s over the
same centres' bare loop for the same steps; with overlap-steps; and at H=40, ~30 s a round here.

Writes OUT/STEM.json and OUT/STEM.md (default benchmarks/results/wire_<hardware>_<date>).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import baselines
from benchmarks.cpuuse import CpuSampler
from benchmarks.federation import centre_copies, span
from clients.data import DEFAULT_CENTRES, prepare_centre
from deploy.local import LocalFederation
from deploy.processes import free_base_port
from models.config import RunConfig, load_defaults

# One checkpoint, after the last round (checkpoint-every = rounds): at H=1 a checkpoint each round is one
# each inner step, 3 GB of disk writes a base round (server/checkpoint.py, clients/training.py) that every
# transfer waits behind. Its cost is shown beside it ("stream fp32, checkpoint each round").
WIRE = {"model": "base", "rounds": 5, "inner-steps": 1, "batch-size": 1, "seq-len": 64, "eval-batches": 1,
        "inner-warmup-steps": 1, "checkpoint-every": 5}
QUICK = {**WIRE, "model": "tiny", "rounds": 2, "seq-len": 32}
# Like the bare loop, which writes none, one checkpoint at the end (a checkpoint each round adds the centres'
# inner state, 1.5 GB each for base, to every round: the wire scenario's last row shows that cost).
RATIO = {"model": "base", "rounds": 3, "inner-steps": 20, "batch-size": 1, "seq-len": 64, "eval-batches": 1,
         "inner-warmup-steps": 2, "checkpoint-every": 3}
RATIO_OVERLAP = 4
# Issue 13 sizes H=20 as "~30 s of compute per round" (the ratio of a GPU round of a 1B model); on a faster
# CPU, as here (~15 s), the same per-round cost weighs twice as much. The same plan at twice the steps shows
# that ratio too; the verdict stays with the plan as specified (H=20).
RATIO_LONG = {**RATIO, "inner-steps": 40}
TARGET_BYTES_PER_SECOND = 1e9
TARGET_ROUND_SECONDS = 4.0
TARGET_RATIO = 0.90
TARGET_COORDINATOR_MODELS = 4.0  # model-sized vectors the coordinator may hold, beyond a chunk per centre
CHUNK_BYTES = 4 << 20  # server/dataplane.py CHUNK and server/chunked.py CHUNK_VALUES x 4 bytes


def _config(run_dir: Path, centres: int, **over: Any) -> RunConfig:
    values = {**load_defaults(), "expected-centres": centres, "threads": 1, "compression": "none",
              "overlap-steps": 0, "round-timeout": 1800.0, "run-dir": str(run_dir), "run-name": run_dir.name, **over}
    return RunConfig.from_mapping(values)


def federate(corpora: dict[str, Path], work: Path, name: str, **over: Any) -> dict[str, Any]:
    """One federation over the Deployment Engine; its run.json."""
    run_dir = work / name
    centres = centre_copies(run_dir, corpora)
    cfg = _config(run_dir, len(centres), **over)
    with CpuSampler() as cpu, LocalFederation(run_dir, centres, base_port=free_base_port(2 + len(centres))) as fed:
        run = fed.wait(fed.submit(cfg.to_mapping()), timeout=3 * 3600)
    if run.get("status") != "finished":
        raise RuntimeError(f"{name}: {run.get('message')}")
    run["cpu-seconds"] = cpu.used(*span(run["rounds"]))
    return run


def wire_figures(run: dict[str, Any]) -> dict[str, Any]:
    """Per steady round: seconds left to moving weights, bytes moved, throughput; and peaks."""
    rounds = []
    steady = run["rounds"][1:]  # round 1: no weights travel (the seed's model)
    # A checkpointed round also writes the centres' inner state (their part of the checkpoint, which the
    # figure leaves out by definition but cannot time apart): rounds without one, where the plan has them.
    for r in [r for r in steady if not r.get("checkpointed")] or steady:
        work = max(m.get("compute-seconds", 0.0) + m.get("eval-seconds", 0.0) for m in r["centres"].values())
        moving = r["wall-seconds"] - work - r["aggregation-seconds"] - r.get("checkpoint-seconds", 0.0)
        moved = r["bytes-sent"] + r["bytes-received"]
        rounds.append({"round": r["round"], "wall": r["wall-seconds"], "work": work,
                       "aggregation": r["aggregation-seconds"], "checkpoint": r.get("checkpoint-seconds", 0.0),
                       "moving": moving, "bytes": moved, "bytes-per-second": moved / moving if moving > 0 else None})
    moving = sum(x["moving"] for x in rounds)
    moved = sum(x["bytes"] for x in rounds)
    last = run["rounds"][-1]
    before = next((e["rss-before-model-bytes"] for e in run.get("events", []) if e.get("event") == "memory"), None)
    peak = last.get("server-peak-rss-bytes")
    # The global model goes to each centre in fp32 (the update back may be bf16): its bytes / centres.
    model_bytes = run["rounds"][1]["bytes-sent"] / len(last["centres"]) if rounds else None
    return {"rounds": rounds,
            "coordinator-model-multiple": (peak - before) / model_bytes if peak and before and model_bytes else None,
            "model-bytes": model_bytes, "centres": len(last["centres"]),
            "bytes-per-second": moved / moving if moving > 0 else None,
            "round-seconds": sum(x["wall"] for x in rounds) / len(rounds),
            "worker-peak-rss-bytes": max(m.get("peak-memory-bytes", 0.0) for m in last["centres"].values()),
            "server-peak-rss-bytes": last.get("server-peak-rss-bytes"),
            "data-plane": last.get("data-plane"), "eval-loss": run["final"]["eval-loss-mean"]}


def ratio_figures(run: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """The run's tokens/s from round 1's push to the last round's end, over the bare loop's; and the
    same for the middle rounds alone (neither the first, which starts cold and cannot train ahead,
    nor the last, which writes the checkpoint): what a longer run approaches, shown beside it."""
    rounds = run["rounds"]
    start, end = span(rounds)
    fed_rate = sum(r["tokens"] for r in rounds) / (end - start)
    bare_rate = bare["tokens"] / bare["compute"]
    middle = rounds[1:-1]
    steady = (sum(r["tokens"] for r in middle) / sum(r["wall-seconds"] for r in middle) / bare_rate
              if middle else None)
    # Where the span's CPU went (benchmarks/cpuuse.py): the centres' training needs bare["compute"] x centres
    # CPU seconds at the bare loop's speed; what the federation's own processes took came out of the same cores.
    return {"federated-tokens-per-second": fed_rate, "bare-loop-tokens-per-second": bare_rate,
            "ratio": fed_rate / bare_rate, "middle-rounds-ratio": steady,
            "round-seconds": [r["wall-seconds"] for r in rounds], "span-seconds": end - start,
            "cpu-seconds": run.get("cpu-seconds", {}), "cores": os.cpu_count(),
            "bare-seconds": bare["compute"], "bare-cpu-seconds": bare["compute"] * len(rounds[-1]["centres"])}


def run_all(quick: bool, ratio: bool, centres: int = 2) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bridgepool-wire-"))
    try:
        corpora: dict[str, Path] = {}
        for name, source in DEFAULT_CENTRES[:centres]:
            corpora[name] = work / "corpora" / name
            prepare_centre(source, corpora[name], max_bytes=400_000)
        plan = QUICK if quick else WIRE
        out: dict[str, Any] = {"plan": plan, "scenarios": {}}
        scenarios = [("stream fp32", {"data-plane": "stream"}),
                     ("stream bf16", {"data-plane": "stream", "wire-dtype": "bf16"}),
                     ("flower fp32", {"data-plane": "flower"})]
        if not quick:  # the tiny model writes no disk traffic worth showing
            scenarios.append(("stream fp32, checkpoint each round", {"data-plane": "stream", "checkpoint-every": 1}))
        for label, over in scenarios:
            name = label.replace(" ", "-").replace(",", "")
            run = federate(corpora, work, name, **{**plan, **over})
            out["scenarios"][label] = wire_figures(run)
            shutil.rmtree(work / name, ignore_errors=True)  # base: ~10 GB of checkpoints and state a scenario
            print(f"{label}: {json.dumps(out['scenarios'][label]['bytes-per-second'])} B/s", flush=True)
        if ratio:
            cfg = _config(work / "bare", len(corpora), **RATIO)
            bare = baselines.local_loop(corpora, cfg, work)
            out["ratio"] = {"plan": RATIO, **ratio_figures(federate(corpora, work, "ratio-stream", **RATIO), bare)}
            # The same with the next round's first steps trained while the server aggregates (overlap-steps).
            over = {**RATIO, "overlap-steps": RATIO_OVERLAP}
            out["ratio-overlap"] = {"plan": over, **ratio_figures(federate(corpora, work, "ratio-overlap", **over),
                                                                   bare)}
            long_bare = baselines.local_loop(corpora, _config(work / "bare-long", len(corpora), **RATIO_LONG), work)
            long_run = federate(corpora, work, "ratio-long", **RATIO_LONG)
            out["ratio-long"] = {"plan": RATIO_LONG, **ratio_figures(long_run, long_bare)}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _multiple(x: float | None) -> str:
    return f"{x:.2f} x" if x is not None else "-"


def report(res: dict[str, Any]) -> str:
    s = res["scenarios"]
    lines = ["# Model updates on the wire: data plane vs Flower messages", "",
             f"Plan: {json.dumps(res['plan'])}; 2 centres on one machine, loopback. "
             "Steady rounds (2..N, those without a checkpoint where there are such); "
             "'moving' = round wall - slowest centre's compute+eval - aggregation - checkpoint; "
             "throughput = model bytes moved (global to each centre + each update) / moving.", "",
             "| scenario | round s | moving s/round | bytes/round | effective throughput | worker peak RSS | "
             "coordinator peak RSS | coordinator / model bytes |", "|---|---|---|---|---|---|---|---|"]
    for name, f in s.items():
        per = f["rounds"]
        lines.append(f"| {name} | {f['round-seconds']:.2f} | {sum(x['moving'] for x in per) / len(per):.2f} | "
                     f"{per[0]['bytes'] / 1e6:,.0f} MB | {(f['bytes-per-second'] or 0) / 1e6:,.0f} MB/s | "
                     f"{f['worker-peak-rss-bytes'] / 2**30:.2f} GiB | "
                     f"{(f['server-peak-rss-bytes'] or 0) / 2**30:.2f} GiB | "
                     f"{_multiple(f.get('coordinator-model-multiple'))} |")
    lines += ["", "## Targets", ""]
    for verdict, text in targets(res):
        lines.append(f"- **{verdict}**: {text}")
    titles = {"ratio": "Real-size ratio", "ratio-overlap": "Real-size ratio with overlap",
              "ratio-long": "The same at twice the steps (H=40: the ~30 s of compute per round issue 13 sizes H=20 "
                            "as; context, not the target's plan)"}
    for key, title in titles.items():
        if key in res:
            r = res[key]
            lines += ["", f"## {title}", "",
                      f"Plan: {json.dumps(r['plan'])}. Federated {r['federated-tokens-per-second']:.0f} tokens/s "
                      f"against the bare loop's {r['bare-loop-tokens-per-second']:.0f} (same centres, steps and "
                      f"batch, no federation): ratio **{r['ratio']:.3f}**; rounds "
                      + ", ".join(f"{x:.1f}" for x in r["round-seconds"]) + " s"
                      + (f"; the middle rounds alone (neither the cold first nor the checkpointed last): "
                         f"{r['middle-rounds-ratio']:.3f}" if r.get("middle-rounds-ratio") else "") + "."]
            if r.get("cpu-seconds"):
                lines += ["", _cpu_line(r)]
    return "\n".join(lines) + "\n"


def _cpu_line(r: dict[str, Any]) -> str:
    """Where the span's CPU seconds went, and what a span at the target ratio would leave beside training."""
    used = r["cpu-seconds"]
    own = {k: v for k, v in used.items() if k != "centre workers" and v >= 0.05}
    have = r["span-seconds"] * r["cores"]
    # At the target the span is the bare loop's / TARGET_RATIO: its CPU, less the steps' own, is all the rest may take.
    room = r["bare-seconds"] / TARGET_RATIO * r["cores"] - r["bare-cpu-seconds"]
    return (f"CPU in the span ({r['span-seconds']:.1f} s x {r['cores']} cores = {have:.0f} CPU-s): the centres' "
            f"workers {used.get('centre workers', 0.0):.1f} (their steps alone: {r['bare-cpu-seconds']:.1f} at the "
            f"bare loop's speed), the federation's own processes {sum(own.values()):.1f} ("
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(own.items(), key=lambda kv: -kv[1]))
            + f"). A span at {TARGET_RATIO:.2f} would leave {room:.1f} CPU-s beside the steps for all of it "
            "(the workers' own eval, hashing and transfers included).")


def targets(res: dict[str, Any]) -> list[tuple[str, str]]:
    """(verdict, text) for each target of issue 13 that this run measured."""
    out = []
    stream, flower = res["scenarios"].get("stream fp32"), res["scenarios"].get("flower fp32")
    if stream is not None:
        bps = stream["bytes-per-second"] or 0.0
        out.append(("met" if bps >= TARGET_BYTES_PER_SECOND else "missed",
                    f"stream throughput >= 1 GB/s on loopback: {bps / 1e9:.2f} GB/s"
                    + (f" (flower: {(flower['bytes-per-second'] or 0) / 1e9:.3f} GB/s, "
                       f"x{bps / flower['bytes-per-second']:.1f})" if flower and flower["bytes-per-second"] else "")))
        out.append(("met" if stream["round-seconds"] <= TARGET_ROUND_SECONDS else "missed",
                    f"a {res['plan']['model']} round in <= 4 s: {stream['round-seconds']:.2f} s"
                    + (f" (flower: {flower['round-seconds']:.2f} s)" if flower else "")))
        multiple = stream.get("coordinator-model-multiple")
        if multiple is not None:  # the chunks: one being received and one being read, per centre
            allowed = TARGET_COORDINATOR_MODELS + stream["centres"] * 2 * CHUNK_BYTES / stream["model-bytes"]
            out.append(("met" if multiple <= allowed else "missed",
                        f"coordinator memory <= 4 x the model's bytes plus a chunk per centre ({allowed:.2f} x): "
                        f"{multiple:.2f} x above the process before the model"
                        + (f" (flower: {flower['coordinator-model-multiple']:.2f} x)"
                           if flower and flower.get("coordinator-model-multiple") else "")))
    ratios = {k: res[k]["ratio"] for k in ("ratio", "ratio-overlap") if k in res}
    if ratios:
        best = max(ratios, key=ratios.get)
        out.append(("met" if ratios[best] >= TARGET_RATIO else "missed",
                    "real-size ratio >= 0.90 of the bare loop: "
                    + ", ".join(f"{v:.3f} ({k})" for k, v in ratios.items())))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bridgepool bench --wire", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model (the smoke test)")
    p.add_argument("--ratio", action="store_true", help="also the real-size ratio (base, H=20 and H=40, ~12 min more)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="", help="file name stem; default wire_<hardware>_<date>")
    args = p.parse_args(argv)
    res = run_all(args.quick, args.ratio)
    from benchmarks.federation import save_results

    print(save_results(res, args.out, "wire", args.tag, report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
