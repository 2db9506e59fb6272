"""Flower ServerApp: the coordination server. It holds no data at all.

Each round: send the global model to every connected centre (in full, as an
int8 delta or as the seed's hash: server/broadcast.py), collect their locally
trained models, reject malformed ones, aggregate (DiLoCo or FedAvg), checkpoint,
and record the round in RUN_DIR/run.json. Centres evaluate the model
they receive on their own held-out split before training, so every round carries
a federated evaluation of the previous global model; a final evaluate message
scores the last one.
"""

from __future__ import annotations

import functools
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from models.background import BackgroundWrite
from models.config import ConfigError, RunConfig
from models.gpt import build_model
from models.memory import release_freed_memory
from models.packing import pack, unpack
from server import chunked
from server.aggregation import OuterOptimizer, round_update
from server.broadcast import Broadcast
from server.checkpoint import CheckpointError, checkpoint_dir, latest_checkpoint, save_checkpoint
from server.dataplane import Plane, open_plane, upload_shapes
from server.identity import Registry
from server.liveness import Liveness
from server.messaging import Exchange, ReplyClock, exchange, prepare, wait_for_centres
from server.metrics import ServerMetrics, centre_balance
from server.privacy import round_record as dp_round_record
from server.runlog import RunLog
from server.spool import SpooledUpdate
from server.validation import screen, token_cap

log = logging.getLogger("bridgepool.server")
app = ServerApp()


class QuorumLost(RuntimeError):
    """Fewer centres replied than the configured quorum."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)
    # The coordinator's work is element-wise and memory-bound (screening, sums, the outer step), on
    # cores the centres keep busy: torch's thread pool spins for a core there. Measured on 2 busy
    # cores, base's outer step took 0.85 s on one thread and 2.6-4.3 s on two.
    torch.set_num_threads(1)
    release_freed_memory()  # freed model-sized buffers leave resident memory (models/memory.py)
    if not cfg.run_dir:
        raise ConfigError("config key 'run-dir' is empty; pass --run-config 'run-dir=\"/path\"'")
    run_dir = Path(cfg.run_dir)
    _setup_logging(run_dir)
    runlog = RunLog(run_dir, cfg.to_mapping(), resume=cfg.resume)
    metrics = ServerMetrics(cfg.run_name)
    try:
        metrics.serve(cfg.metrics_port)  # for this process's lifetime, i.e. the run's
        final = federate(grid, cfg, run_dir, runlog, metrics)
    except Exception as err:
        log.error("run stopped: %s", err)
        metrics.linger()  # the endpoint goes with this process: let Prometheus see the last round first
        runlog.finish("failed", message=str(err))
        raise
    metrics.linger()
    runlog.finish("finished", final=final)


def federate(grid: Grid, cfg: RunConfig, run_dir: Path, runlog: RunLog,
             metrics: ServerMetrics | None = None) -> dict:
    """The run's rounds; with `data-plane = "stream"` the weights travel on a data plane this
    process serves for the run's lifetime (server/dataplane.py)."""
    metrics = metrics or ServerMetrics(cfg.run_name)  # recorded, not served
    # The process before any model exists (interpreter, torch, Flower, and the code of torch's optimisers:
    # the first one built imports torch._dynamo and sympy, ~78 MiB whatever the model's size): what the
    # rounds' peak adds to it is the coordinator's memory cost per model byte (benchmarks/wire.py).
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    runlog.event("memory", **{"rss-before-model-bytes": _peak_rss()})
    outer, start, broadcast = start_point(cfg, run_dir, runlog)
    if cfg.data_plane != "stream":
        return _rounds(grid, cfg, run_dir, runlog, metrics, outer, start, broadcast, None)
    n = broadcast.base.size
    plane = open_plane(cfg.data_plane_host, cfg.data_plane_port, cfg.data_plane_advertise, cfg.data_plane_certfile,
                       cfg.data_plane_keyfile, upload_shapes(n, cfg.compression, cfg.wire_dtype),
                       spool=run_dir / "spool")  # the updates wait on disk, not in memory (server/spool.py)
    runlog.event("data-plane", url=plane.url)
    try:
        return _rounds(grid, cfg, run_dir, runlog, metrics, outer, start, broadcast, plane)
    finally:
        plane.server.stop()


def _rounds(grid: Grid, cfg: RunConfig, run_dir: Path, runlog: RunLog, metrics: ServerMetrics,
            outer: OuterOptimizer, start: int, broadcast: Broadcast, plane: Plane | None) -> dict:
    liveness = Liveness()
    registry = _registry(cfg, runlog)

    ready = wait_for_centres(grid, cfg.expected_centres, cfg.connect_timeout)
    if registry is not None:  # a node whose key is no centre's is not asked to get ready either
        ready = _listed(grid, registry, liveness, runlog)
    for centre, why in prepare(grid, ready, min(cfg.connect_timeout, cfg.round_timeout), cfg.quorum).items():
        log.warning("%s did not get ready before round 1 (%s); round 1 will tell", centre, why)
    clock = ReplyClock(cfg.inner_steps)
    saver = BackgroundWrite("a checkpoint")
    sums: np.ndarray | None = None  # the vector a round's mean is summed in, kept for the next round
    saved = start - 1  # the newest round with a checkpoint (a resumed run starts after one; 0: none)
    try:
        for rnd in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            nodes = _listed(grid, registry, liveness, runlog)  # centres that (re)joined take part from now on
            reference = _sent(broadcast, outer, plane)  # what the centres train from
            ex = exchange(grid, nodes, "train", broadcast, rnd, cfg.round_timeout, liveness, cfg.quorum,
                          expected=clock.expected(), plane=plane,
                          ahead=rnd < cfg.rounds and cfg.compression == "none")  # int8 rounds send deltas
            clock.observe(ex)
            # The previous round's checkpoint was written while this round's bytes travelled; it is on disk
            # before a quorum error names it, and before the step changes the tensors it reads.
            ckpt_wait = saver.wait()
            t_agg = time.perf_counter()  # screening included: on the data plane it is the same pass as the sum
            if plane is None:
                accepted = _accept(ex, reference, cfg.max_norm_factor, token_cap(cfg))
            else:
                accepted, norms, folded = _accept_spooled(ex, broadcast.base, reference, cfg, into=sums)
            for centre, code in ex.codes.values():
                metrics.reject(centre, code)
            if len(accepted) < cfg.quorum:
                last = checkpoint_dir(run_dir) / f"round-{saved:04d}"
                raise QuorumLost(
                    f"round {rnd}: {len(accepted)} of {len(nodes)} centres replied with a valid "
                    f"update, below the quorum of {cfg.quorum} "
                    f"({'; '.join(f'{k}: {v}' for k, v in ex.failures.items())}); "
                    f"stopped after round {rnd - 1}"
                    + (f" (checkpoint {last}); restart the missing centres and resume with --resume"
                       if saved else "; restart the missing centres and start again")
                )
            tokens = [r.metrics["tokens"] for r in accepted]
            if plane is None:
                update = round_update(outer, [r.state for r in accepted], tokens, cfg.aggregator, cfg.dp_clip,
                                      cfg.dp_noise_multiplier, reference=reference)
            else:
                if folded is None or not _folds(cfg, len(accepted)):
                    folded = chunked.combined([r.arrays for r in accepted], tokens, norms, broadcast.base,
                                              cfg.aggregator, cfg.dp_clip, cfg.dp_noise_multiplier, into=sums)
                update = unpack(folded, reference, copy=False)
                sums = folded  # the next round sums in it again: its pages stay mapped (chunked.zeroed)
                del folded
            for r in ex.replies:  # the centres' updates (buffers, spool files) go before the outer step allocates
                if isinstance(r.arrays, SpooledUpdate):
                    r.arrays.discard()
                r.arrays, r.state = {}, {}
            _free_base(broadcast, outer, plane)
            outer.apply(update, consume=True)  # the round's own sum, not needed after the step
            del update
            agg_seconds = time.perf_counter() - t_agg
            t_ckpt = time.perf_counter()
            if cfg.checkpointed(rnd):  # every checkpoint-every rounds and the last: the centres keep their state then
                # Zero-copy (safetensors reads the live tensors), in the background: the next round waits for it
                # before its own step. A coordinator killed meanwhile resumes from the checkpoint before.
                saver.start(functools.partial(save_checkpoint, run_dir, rnd, outer.weights(), outer.optimizer_state(),
                                              cfg.to_mapping(),
                                              broadcast=broadcast.base if cfg.compression == "int8" else None,
                                              keep=cfg.checkpoint_keep),
                            f"the checkpoint of round {rnd}")
                saved = rnd
            reference = None  # the old b goes as soon as the next round's replaces it
            record = _round_record(rnd, ex, accepted, agg_seconds, time.perf_counter() - t0)
            # What the round waited for checkpoints: the last round's write, if it had not ended, and this start.
            record["checkpoint-seconds"] = ckpt_wait + time.perf_counter() - t_ckpt
            record["checkpointed"] = saved == rnd  # the centres wrote their inner state in this round too
            # This process's peak resident memory so far (Linux reports KiB): the coordinator's memory cost.
            record["server-peak-rss-bytes"] = _peak_rss()
            if plane is not None:  # what actually crossed the data plane's sockets, run total so far
                record["data-plane"] = {"url": plane.url, "bytes-served": plane.server.bytes_served,
                                        "bytes-received": plane.server.bytes_received}
            if cfg.dp_clip > 0:  # epsilon spent by the rounds so far (rounds 1..rnd of this model)
                record["dp"] = dp_round_record(cfg.dp_clip, cfg.dp_noise_multiplier, cfg.dp_delta, rnd, len(accepted))
            runlog.add_round(record)
            metrics.observe_round(record)
            log.info("round %d/%d: train loss %.4f, eval loss %.4f, %d/%d centres, %.1fs", rnd, cfg.rounds,
                     record["train-loss-mean"], record["eval-loss-mean"], len(accepted), len(nodes),
                     record["wall-seconds"])
    except BaseException:
        saver.wait(quiet=True)  # a round that fails still leaves the last round's checkpoint whole
        raise
    saver.wait()  # the last round's checkpoint is on disk before the run can finish
    # With int8 the centres score b_new, the master weights to within one int8 step (error feedback).
    _sent(broadcast, outer, plane)
    final_ex = exchange(grid, _listed(grid, registry, liveness, runlog), "evaluate", broadcast, cfg.rounds,
                        cfg.round_timeout, liveness, plane=plane)
    final_model = run_dir / "final_model.safetensors"
    save_file({k: p.detach().contiguous() for k, p in outer.params.items()}, final_model)
    centres = {r.centre: r.metrics for r in final_ex.replies}
    return {"model": str(final_model), "centres": centres,
            # a final reply without eval-loss is left out of the mean, it does not end the run
            "eval-loss-mean": _mean([m["eval-loss"] for m in centres.values() if "eval-loss" in m]),
            "failures": final_ex.failures,
            # The run's totals on the data plane's sockets (the final evaluation's downloads included).
            **({"data-plane": {"bytes-served": plane.server.bytes_served,
                               "bytes-received": plane.server.bytes_received}} if plane is not None else {})}


def _registry(cfg: RunConfig, runlog: RunLog) -> Registry | None:
    """The operator's registry of centre keys (server/identity.py), or None: names as replies claim them."""
    if not cfg.centre_keys:
        log.warning("centre names are taken from the replies (no centre-keys registry: a plain local run "
                    "without SuperNode authentication); a node keeps the first name it claims")
        runlog.event("centre-names", pinned=False)
        return None
    registry = Registry.load(cfg.centre_keys)
    log.info("centre names pinned to registered keys: %s (from %s)", ", ".join(registry.names()), cfg.centre_keys)
    runlog.event("centre-names", pinned=True, registry=cfg.centre_keys, centres=registry.names())
    return registry


def _listed(grid: Grid, registry: Registry | None, liveness: Liveness, runlog: RunLog) -> list[int]:
    """The nodes the SuperLink lists now. With a registry, each one's name pinned to its registered key, and
    only nodes whose key is a centre's: one whose key no CENTRE.pub holds is sent nothing (named once)."""
    if registry is None:
        return sorted(grid.get_node_ids())
    nodes = list(grid.get_nodes())  # NodeInfo: the key each node authenticates with, as the SuperLink holds it
    pins = registry.pins(nodes)
    for node in sorted(n for n, c in pins.items() if c is None and n not in (liveness.pinned or {})):
        log.warning("node %d is sent nothing: its SuperNode key is none of the registered centres' (%s); "
                    "add its CENTRE.pub there, or unregister it at the SuperLink", node, registry.source)
        runlog.event("unregistered-node", node=node, registry=registry.source)
    liveness.pin(pins)
    return sorted(n for n, c in pins.items() if c is not None)


def start_point(cfg: RunConfig, run_dir: Path, runlog: RunLog) -> tuple[OuterOptimizer, int, Broadcast]:
    """The outer optimiser to start from, the first round to run, and the broadcast state
    (the copy b the centres hold: the initial model, or the checkpoint's).

    With `resume`, the newest checkpoint that verifies (a corrupted or truncated
    one is refused with its file named, and the previous round is used); with
    no checkpoint at all, round 1. If checkpoints exist but none verifies, stop
    rather than silently restart from scratch.
    """
    state = {k: v.float() for k, v in build_model(cfg.model, seed=cfg.seed).state_dict().items()}
    if not cfg.resume:
        outer = OuterOptimizer(state, cfg.strategy, cfg.outer_lr, cfg.outer_momentum)
        return outer, 1, Broadcast(outer.vector(), cfg.compression)
    ckpt = latest_checkpoint(run_dir, on_refused=lambda err: runlog.event("checkpoint-refused", error=str(err)))
    if ckpt is None:
        found = sorted(checkpoint_dir(run_dir).glob("round-*"))
        if found:
            raise CheckpointError(f"resume: none of the {len(found)} checkpoints in {checkpoint_dir(run_dir)} "
                                  "verifies (see the errors above); refusing to start again from round 1")
        log.info("resume: no checkpoint in %s yet; starting at round 1", run_dir)
        outer = OuterOptimizer(state, cfg.strategy, cfg.outer_lr, cfg.outer_momentum)
        return outer, 1, Broadcast(outer.vector(), cfg.compression)
    _check_same_run(cfg, ckpt.config, ckpt.path)
    initial = pack(state)  # for its hash: round 1's "build it from the seed" is known by it
    outer = OuterOptimizer(ckpt.model, cfg.strategy, cfg.outer_lr, cfg.outer_momentum)
    outer.load_optimizer_state(ckpt.outer)
    log.info("resuming after round %d from %s", ckpt.round, ckpt.path)
    runlog.event("resumed-from", round=ckpt.round, path=str(ckpt.path))
    base = ckpt.broadcast if ckpt.broadcast is not None else outer.vector()  # without int8 (and older ones): b = m
    return outer, ckpt.round + 1, Broadcast(initial, cfg.compression, base=base)


RESUME_FIXED = ("model", "strategy")  # a checkpoint's weights and momentum mean nothing under others


def _check_same_run(cfg: RunConfig, saved: dict, path: Path) -> None:
    """ConfigError unless the checkpoint was written under this run's model and strategy."""
    now = cfg.to_mapping()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_FIXED if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(f"resume: checkpoint {path} belongs to a run with another {', '.join(changed)}; resume "
                          "with the checkpoint's settings, or start a new run in another --run-dir")


def _sent(broadcast: Broadcast, outer: OuterOptimizer, plane: Plane | None = None) -> dict[str, torch.Tensor]:
    """Advance the broadcast to the master weights; the model the centres will hold, as a state dict.
    Without int8, b is the master weights' own vector (OuterOptimizer.flat): nothing is copied, and
    the outer step changes b in place once the round's replies are summed (`_free_base` first). With
    int8, b is b_new, a vector of its own, and the old one is the delta's base."""
    if plane is not None:
        plane.server.end_exchange()  # the last round's blobs are withdrawn: no new download of them starts
    # The reference is views of b, valid until the round's outer step.
    return unpack(broadcast.advance(outer.vector(), owned=True), outer.weights(), copy=False)


def _free_base(broadcast: Broadcast, outer: OuterOptimizer, plane: Plane | None) -> None:
    """Before the outer step writes the master weights in place: where they are b and a late centre
    is still downloading b (a centre whose reply the round did not wait for), they move to a new
    vector, so that download gets the bytes its manifest promised, whole. Flower's messages copy b
    when they are pushed: nothing reads it later."""
    if plane is None or broadcast.base.__array_interface__["data"][0] != outer.flat.data_ptr():
        return
    plane.server.end_exchange()  # no new download of b starts
    if plane.server.reading(broadcast.base):
        log.info("a download of the round's model is still under way: the outer step writes a copy of it")
        outer.relocate()


def _accept(ex: Exchange, reference: dict[str, torch.Tensor], max_norm_factor: float, max_tokens: float) -> list:
    """Replies whose update passes validation (server/validation.py), in centre-name order,
    so the floating-point sum of the aggregate does not depend on arrival order.
    `max_tokens`: the most tokens a reply may claim (validation.token_cap)."""
    accepted, rejected = screen([(r.arrays, r.metrics) for r in ex.replies], reference, max_norm_factor, max_tokens)
    for i, err in rejected.items():
        centre = ex.replies[i].centre
        ex.fail(centre, centre, err.reason, f"rejected ({err.reason}): {err}")
    for i, state in accepted.items():
        ex.replies[i].state = state
    for who, why in ex.failures.items():
        log.warning("%s did not contribute: %s", who, why)
    return sorted((ex.replies[i] for i in accepted), key=lambda r: (r.centre, r.node_id))


def _folds(cfg: RunConfig, accepted: int) -> bool:
    """Whether the round's aggregate is the plain token-weighted mean (what screening folds)."""
    return cfg.dp_clip == 0 and (cfg.aggregator == "mean" or accepted < 3)


def _accept_spooled(ex: Exchange, base: np.ndarray, reference: dict[str, torch.Tensor],
                    cfg: RunConfig, into: np.ndarray | None = None) -> tuple[list, list[float], np.ndarray | None]:
    """`_accept` for updates that came on the data plane (spooled on disk): the accepted replies in
    centre-name order, their pseudo-gradient norms, and their mean when screening could fold it in
    the same read (server/chunked.py)."""
    replies = sorted(ex.replies, key=lambda r: (r.centre, r.node_id))
    kept, rejected, folded = chunked.screen_and_mean(
        [(r.arrays, r.metrics) for r in replies], base, chunked.Layout.of(reference), cfg.max_norm_factor,
        token_cap(cfg), fold=_folds(cfg, len(replies)), into=into)
    for i, err in rejected.items():
        centre = replies[i].centre
        ex.fail(centre, centre, err.reason, f"rejected ({err.reason}): {err}")
    for who, why in ex.failures.items():
        log.warning("%s did not contribute: %s", who, why)
    return [replies[i] for i in kept], list(kept.values()), folded


def _round_record(rnd: int, ex: Exchange, accepted: list, agg_seconds: float, wall: float) -> dict:
    centres = {r.centre: {**r.metrics, "bytes-sent": r.nbytes} for r in ex.replies}
    return {
        "round": rnd,
        "time": time.time(),
        "wall-seconds": wall,
        "aggregation-seconds": agg_seconds,
        "push-seconds": ex.push_seconds,
        "replied-after-seconds": ex.replied_after,  # per centre, from the push to its reply at the server
        "replied": len(accepted),
        "failed": ex.failures,
        "bytes-received": sum(r.nbytes for r in ex.replies),
        "bytes-sent": ex.bytes_sent,
        **({"stale-base": ex.resent} if ex.resent else {}),  # centre -> form it could not apply
        "tokens": sum(r.metrics["tokens"] for r in accepted),
        "train-loss-mean": _mean([r.metrics["train-loss"] for r in accepted]),
        "eval-loss-mean": _mean([r.metrics["eval-loss"] for r in accepted]),
        "centres": centres,
        **centre_balance(wall, {r.centre: r.metrics for r in accepted}),
    }


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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
