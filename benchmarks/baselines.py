"""Non-federated baselines on the same model, data and token budget.

- centralised: one process trains on the union of the centres' data, each step
  taking every centre's batch for that step (same tokens per step as all centres
  together). The upper bound; allowed only here, in the benchmark.
- all-reduce: torch DDP over gloo, one process per centre on its own data,
  gradients averaged every step (pooling compute inside one datacentre).
- local loop: each centre's CentreTrainer alone, concurrently, no communication:
  the reference for federated utilisation.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import cpushare
from clients.data import TokenSampler, load_split
from clients.training import CentreTrainer, autocast_dtype, forward, lr_schedule, resolve_device, sync
from models.config import RunConfig
from models.gpt import build_model


def loopback_bytes() -> int:
    """Bytes through the loopback interface so far (/proc/net/dev, rx == tx on lo)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def evaluate_state(state: dict[str, torch.Tensor], centres: dict[str, Path], cfg: RunConfig,
                   scratch: Path) -> dict[str, float]:
    """Held-out loss of `state` on each centre's validation split (as the federation measures it)."""
    out = {}
    for name, data_dir in centres.items():
        trainer = CentreTrainer(name, data_dir, scratch / name, cfg)
        trainer.load_global(state)
        out[name] = trainer.evaluate()["eval-loss"]
    return out


def _samplers(centres: dict[str, Path], cfg: RunConfig, seq_len: int) -> list[TokenSampler]:
    import zlib

    return [TokenSampler(load_split(d, "train", n), seq_len, cfg.batch_size, zlib.crc32(n.encode()) ^ cfg.seed)
            for n, d in centres.items()]


def centralised(centres: dict[str, Path], cfg: RunConfig, steps: int, threads: int) -> dict[str, Any]:
    """One model on the union of the centres' batches, on the device and precision the
    federated rows use (`device`, `precision`), so a GPU run compares like with like."""
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    model = build_model(cfg.model, seed=cfg.seed).to(device)
    seq = cfg.seq_len or model.config.block_size
    opt = model.configure_optimizer(cfg.inner_lr, cfg.inner_weight_decay, (0.9, 0.95))
    samplers = _samplers(centres, cfg, seq)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_schedule(step, cfg)
        xs, ys = zip(*(s.batch(step) for s in samplers), strict=True)
        _, loss = forward(model, np.concatenate(xs), np.concatenate(ys), device, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sync(device)  # the queued kernels are part of the wall time
    wall = time.perf_counter() - t0
    tokens = steps * cfg.batch_size * seq * len(centres)
    return {"state": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
            "tokens": tokens, "wall": wall, "compute": wall, "bytes": 0}



def _ddp_rank(rank: int, world: int, port: int, centres: dict[str, Path], cfg: RunConfig, steps: int,
              out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # The federated rows' device and precision. gloo all-reduces CUDA tensors too (through
    # host memory), and every rank may share one GPU, which NCCL refuses.
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    model = build_model(cfg.model, seed=cfg.seed).to(device)
    ddp = DDP(model)
    seq = cfg.seq_len or model.config.block_size
    opt = model.configure_optimizer(cfg.inner_lr, cfg.inner_weight_decay, (0.9, 0.95))
    sampler = _samplers(centres, cfg, seq)[rank]
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_schedule(step, cfg)
        x, y = sampler.batch(step)
        _, loss = forward(ddp, x, y, device, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # gradients all-reduced here, every step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sync(device)  # the queued kernels are part of the wall time
    dist.barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "wall": wall}, out)
    dist.destroy_process_group()


def all_reduce(centres: dict[str, Path], cfg: RunConfig, steps: int, scratch: Path) -> dict[str, Any]:
    """DDP in a network namespace of its own (root): its loopback counters then see only
    gloo's traffic, so the bytes are measured even on a busy machine."""
    import json
    import shutil
    import subprocess
    import sys

    spec = scratch / "ddp-spec.json"
    spec.write_text(json.dumps({"centres": {k: str(v) for k, v in centres.items()},
                                "config": cfg.to_mapping(), "steps": steps, "out": str(scratch / "ddp.pt")}))
    inner = [sys.executable, "-m", "benchmarks.baselines", "ddp", str(spec)]
    isolated = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    argv = (["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "ddp", *inner]
            if isolated else inner)
    subprocess.run(argv, check=True, timeout=3600)
    res = torch.load(scratch / "ddp.pt", weights_only=True)
    seq = cfg.seq_len or build_model(cfg.model, seed=0).config.block_size
    return {"state": {k: v.float() for k, v in res["state"].items()}, "wall": res["wall"],
            "compute": res["wall"], "tokens": steps * cfg.batch_size * seq * len(centres), "bytes": res["bytes"],
            "bytes-source": "own network namespace" if isolated else "shared loopback (not isolated: upper bound)"}


def _all_reduce_here(centres: dict[str, Path], cfg: RunConfig, steps: int, out: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b0 = loopback_bytes()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_rank, args=(r, len(centres), port, centres, cfg, steps, out))
             for r in range(len(centres))]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"DDP rank exited with {p.exitcode}")
    res = torch.load(out, weights_only=True)
    res["bytes"] = loopback_bytes() - b0
    torch.save(res, out)


def _local_centre(name: str, data_dir: Path, scratch: str, cfg: RunConfig, q: Any, group: Path | None) -> None:
    if group is not None:  # the centre's CPU share (benchmarks/cpushare.py), before any work
        cpushare.join(group)
    torch.set_num_threads(1)
    trainer = CentreTrainer(name, data_dir, Path(scratch), cfg)
    t0 = time.perf_counter()
    compute = 0.0
    for rnd in range(1, cfg.rounds + 1):
        compute += trainer.train_round(rnd).metrics["compute-seconds"]
    q.put((name, time.perf_counter() - t0, compute))


def local_loop(centres: dict[str, Path], cfg: RunConfig, scratch: Path,
               shares: cpushare.CpuShares | None = None) -> dict[str, Any]:
    """Every centre's own training loop, concurrently, with no federation at all
    (`shares`: each in its own capped cgroup, as its federated processes would be)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    groups = shares.groups if shares is not None else {}
    procs = [ctx.Process(target=_local_centre, args=(n, d, str(scratch / f"local-{n}"), cfg, q, groups.get(n)))
             for n, d in centres.items()]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    seq = cfg.seq_len or build_model(cfg.model, seed=0).config.block_size
    tokens = cfg.rounds * cfg.inner_steps * cfg.batch_size * seq * len(centres)
    compute = max(r[2] for r in results)  # the slowest centre bounds the pooled rate
    # Steady-state rate: tokens over training time, without process start-up.
    return {"wall": wall, "round-wall": compute, "tokens": tokens, "compute": compute, "bytes": 0, "state": None}


if __name__ == "__main__":  # `python -m benchmarks.baselines ddp SPEC.json` (see all_reduce)
    import json
    import sys

    spec = json.loads(Path(sys.argv[2]).read_text())
    _all_reduce_here({k: Path(v) for k, v in spec["centres"].items()}, RunConfig.from_mapping(spec["config"]),
                     spec["steps"], spec["out"])
