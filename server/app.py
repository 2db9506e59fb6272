"""Flower ServerApp: the coordination server. It holds no data at all.

Each round: send the global model to every connected centre, collect their
locally trained models, reject malformed ones, aggregate (DiLoCo or FedAvg),
checkpoint, and record the round in RUN_DIR/run.json. Centres evaluate the model
they receive on their own held-out split before training, so every round carries
a federated evaluation of the previous global model; a final evaluate message
scores the last one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from models.config import ConfigError, RunConfig
from models.gpt import build_model
from server.aggregation import OuterOptimizer, aggregate
from server.checkpoint import latest_checkpoint, save_checkpoint
from server.messaging import Exchange, exchange, wait_for_centres
from server.runlog import RunLog
from server.validation import UpdateRejected, decode_update, validate_update

log = logging.getLogger("bridgepool.server")
app = ServerApp()


class QuorumLost(RuntimeError):
    """Fewer centres replied than the configured quorum."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)
    if not cfg.run_dir:
        raise ConfigError("config key 'run-dir' is empty; pass --run-config 'run-dir=\"/path\"'")
    run_dir = Path(cfg.run_dir)
    _setup_logging(run_dir)
    runlog = RunLog(run_dir, cfg.to_mapping(), resume=cfg.resume)
    try:
        final = federate(grid, cfg, run_dir, runlog)
    except Exception as err:
        log.error("run stopped: %s", err)
        runlog.finish("failed", message=str(err))
        raise
    runlog.finish("finished", final=final)


def federate(grid: Grid, cfg: RunConfig, run_dir: Path, runlog: RunLog) -> dict:
    state = {k: v.float() for k, v in build_model(cfg.model, seed=cfg.seed).state_dict().items()}
    outer = OuterOptimizer(state, cfg.strategy, cfg.outer_lr, cfg.outer_momentum)
    start = 1
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        outer = OuterOptimizer(ckpt.model, cfg.strategy, cfg.outer_lr, cfg.outer_momentum)
        outer.load_optimizer_state(ckpt.outer)
        start = ckpt.round + 1
        log.info("resuming after round %d from %s", ckpt.round, ckpt.path)
        runlog.event("resumed-from", round=ckpt.round, path=str(ckpt.path))
    reference = outer.state()

    wait_for_centres(grid, cfg.expected_centres, cfg.connect_timeout)
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        nodes = sorted(grid.get_node_ids())  # centres that (re)joined take part from now on
        ex = exchange(grid, nodes, "train", reference, rnd, cfg.round_timeout)
        accepted = _accept(ex, reference)
        if len(accepted) < cfg.quorum:
            raise QuorumLost(
                f"round {rnd}: {len(accepted)} of {len(nodes)} centres replied with a valid "
                f"update, below the quorum of {cfg.quorum} ({'; '.join(f'{k}: {v}' for k, v in ex.failures.items())}); "
                f"resume later from the round {rnd - 1} checkpoint with --resume"
            )
        t_agg = time.perf_counter()
        reference = aggregate(outer, [r.state for r in accepted], [r.metrics["tokens"] for r in accepted])
        agg_seconds = time.perf_counter() - t_agg
        save_checkpoint(run_dir, rnd, reference, outer.optimizer_state(), cfg.to_mapping())
        record = _round_record(rnd, ex, accepted, agg_seconds, time.perf_counter() - t0)
        runlog.add_round(record)
        log.info("round %d/%d: train loss %.4f, eval loss %.4f, %d/%d centres, %.1fs", rnd, cfg.rounds,
                 record["train-loss-mean"], record["eval-loss-mean"], len(accepted), len(nodes),
                 record["wall-seconds"])

    final_ex = exchange(grid, sorted(grid.get_node_ids()), "evaluate", reference, cfg.rounds,
                        cfg.round_timeout)
    final_model = run_dir / "final_model.safetensors"
    save_file({k: v.contiguous().clone() for k, v in reference.items()}, final_model)
    centres = {r.centre: r.metrics for r in final_ex.replies}
    return {"model": str(final_model), "centres": centres,
            "eval-loss-mean": _mean([m["eval-loss"] for m in centres.values()]),
            "failures": final_ex.failures}


def _accept(ex: Exchange, reference: dict[str, torch.Tensor]) -> list:
    accepted = []
    for reply in ex.replies:
        try:
            reply.state = decode_update(reply.arrays, reference)
            validate_update(reply.state, reference, reply.metrics)
        except UpdateRejected as err:
            log.warning("rejected update from %s: %s", reply.centre, err)
            ex.failures[reply.centre] = f"rejected: {err}"
            continue
        accepted.append(reply)
    for who, why in ex.failures.items():
        log.warning("%s did not contribute: %s", who, why)
    return accepted


def _round_record(rnd: int, ex: Exchange, accepted: list, agg_seconds: float, wall: float) -> dict:
    centres = {r.centre: {**r.metrics, "bytes-sent": r.nbytes} for r in ex.replies}
    return {
        "round": rnd,
        "time": time.time(),
        "wall-seconds": wall,
        "aggregation-seconds": agg_seconds,
        "replied": len(accepted),
        "failed": ex.failures,
        "bytes-received": sum(r.nbytes for r in ex.replies),
        "bytes-sent": ex.bytes_sent,
        "tokens": sum(r.metrics["tokens"] for r in accepted),
        "train-loss-mean": _mean([r.metrics["train-loss"] for r in accepted]),
        "eval-loss-mean": _mean([r.metrics["eval-loss"] for r in accepted]),
        "centres": centres,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _setup_logging(run_dir: Path) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("bridgepool")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    root.addHandler(logging.StreamHandler())
