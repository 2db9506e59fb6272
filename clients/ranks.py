"""A centre is a cluster: N data-parallel ranks train each round, rank 0 alone talks to the outside.

    bridgepool centre serve --nproc 2 --centre fr-genci --data-dir D --state-dir S --socket S/worker.sock

`centre serve --nproc N` re-launches itself under torchrun (`torch.distributed.run`, whose elastic
agent starts and watches the ranks; clients/launch.py builds its command line and supervises it).
Every rank builds the same `CentreTrainer` with its own slice of each step's batch (clients/data.py
`TokenSampler`: the batch of step s depends only on (seed, centre, s, rank)). Rank 0 runs the
ordinary centre worker (clients/worker.py: the socket the ClientApp relays through, the data plane,
the egress guard, the policy, the ledger); ranks > 0 open no socket to the outside and `follow` it:
rank 0's `RankTrainer` broadcasts each command it is about to run (build a run's trainer, load the
global model, evaluate (with --shard), train ahead, train a round) on a command group, and every
rank runs it in step:

    rank 0:  load_global -> weights broadcast from rank 0 -> train_round under DDP -> reply
    rank k:  "load"      -> weights broadcast from rank 0 -> train_round under DDP

With `--shard` the ranks split the model instead of each holding it whole (FSDP2, clients/shard.py):
"load" scatters rank 0's full model into the shards, evaluation runs on every rank (each forward
gathers the weights), and the round's reply is gathered whole onto rank 0.

The run's `batch-size` stays the centre's batch per inner step, whatever its hardware: each of N
ranks trains a slice of b = batch-size / N windows (the server's token cap, the aggregation's
weights and the optimisation are the same as with one rank; more ranks make a round faster). DDP
all-reduces (averages) the gradients inside the centre, so every rank ends a round with the same
weights and rank 0's copy is the centre's; with equal slices the average of the ranks' mean
gradients is the mean gradient of the whole batch, so N ranks of batch b train as one rank of
batch N x b does (tests/test_ranks.py). Evaluation runs on rank 0 alone (held-out loss of
the model it was sent; no collective). The inner AdamW state is saved per rank on the centre's disk
(`rank{k}-inner-optim-round-R.pt`; rank 0 keeps the single-process name).

Failures: a collective that fails on rank 0 (a rank died, its connection closed) raises RankFailure
naming the centre and the rank(s) gone; the worker replies with that error, then exits; the agent
(which also names the failed rank in its log) stops the other ranks and exits, and `supervise`
starts the centre's ranks again (`--max-restarts`); the federation's quorum covers the round. A
rank > 0 whose collective fails exits at once. The agent stops every rank when it is stopped. A
centre on several nodes waits at most --rdzv-timeout at the rendezvous: then `supervise` names the
centre and the node (and its ranks) that never came (`rendezvous_missing`), before any rank started.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from clients.shard import full_state, load_full, optim_local, optim_sharded, shard
from clients.training import Ahead, CentreTrainer, RoundResult, resolve_device
from clients.worker import CentreWorker
from models.config import RunConfig

log = logging.getLogger("bridgepool.ranks")
# Inside a round the ranks wait on each other for at most this long (a hung, not dead, rank).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
VOUCH_GRACE = 30.0  # seconds a failed rank 0 waits for the runtime to check its error reply, then exits
# Between rounds (and runs) ranks > 0 wait on rank 0's next command for as long as the centre is up.
IDLE_TIMEOUT = timedelta(days=365)


class RankFailure(RuntimeError):
    """A rank of the centre died or left mid-round; the message names the centre and the rank."""


def backend(device: str) -> str:
    """gloo for CPU ranks, nccl for CUDA ranks (one GPU per rank)."""
    return "nccl" if resolve_device(device or "auto").type == "cuda" else "gloo"


@dataclass
class Ranks:
    """This process's place in its centre's group, and the command channel from rank 0."""

    centre: str
    rank: int
    world: int
    commands: Any = None  # the gloo group commands travel on (long timeout: idle ranks wait on it)
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of each rank
    failed: str = ""  # set on rank 0 once a collective failed: the worker then exits
    shard: bool = False  # --shard: the model's parameters are split over the ranks (FSDP2, clients/shard.py)

    @classmethod
    def join(cls, centre: str, device: str, rank: int | None = None, world: int | None = None,
             shard: bool = False) -> Ranks:
        """Join the centre's process group (torchrun's environment, or rank/world given with
        MASTER_ADDR/MASTER_PORT set, as the tests do); `shard`: every rank of the centre was started
        with --shard."""
        rank = int(os.environ["RANK"]) if rank is None else rank
        world = int(os.environ["WORLD_SIZE"]) if world is None else world
        name = backend(device)
        if name == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))  # "cuda" is then this rank's GPU
        dist.init_process_group(name, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        peers: list[Any] = [None] * world
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=commands)
        log.info("[%s] rank %d of %d joined (%s)", centre, rank, world, name)
        return cls(centre, rank, world, commands, [tuple(p) for p in peers], shard=shard)

    def send(self, command: tuple[Any, ...]) -> None:
        self.broadcast(command)

    def receive(self) -> tuple[Any, ...]:
        return self.broadcast(None)

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def gone(self, wait: float = 2.0) -> list[int]:
        """Ranks on this host whose process has exited (a zombie counts): the ones to name. A dead
        rank's sockets close a moment before its process is seen to exit, hence the short wait."""
        here = socket.gethostname()
        deadline = time.monotonic() + wait
        while True:
            gone = [r for r, (host, pid) in enumerate(self.peers)
                    if r != self.rank and host == here and not _alive(pid)]
            if gone or time.monotonic() > deadline:
                return gone
            time.sleep(0.1)

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run a step all ranks take part in; on rank 0 a failure becomes RankFailure naming the rank(s)."""
        if self.failed:
            raise RankFailure(self.failed)
        try:
            yield
        except Exception as err:
            if self.rank != 0:
                raise
            gone = self.gone()
            who = (f"rank {', '.join(map(str, gone))}" if gone else "a rank on another node or one that hung")
            self.failed = (f"centre {self.centre}: {who} of {self.world} failed during {what} ({err}); "
                           "the centre's ranks restart, the federation's quorum covers the round")
            raise RankFailure(self.failed) from err

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class RankTrainer(CentreTrainer):
    """A CentreTrainer that trains under DDP (or, with --shard, FSDP2) with the centre's other
    ranks. On rank 0 each public call first tells the other ranks to make it too; they get it in
    `follow`."""

    def __init__(self, centre: str, data_dir: Path, state_dir: Path, cfg: RunConfig, ranks: Ranks,
                 speed: float = 1.0):
        """`speed` (an emulated slower centre) is rank 0's: the others wait for it in each all-reduce."""
        self.ranks = ranks
        if cfg.budgeted and ranks.world > 1:
            # Each rank would stop by its own clock and DDP would hang on the step one of them skips.
            raise ValueError(f"centre {centre}: round-seconds (a time budget) is not supported with several ranks "
                             "yet; set round-seconds = 0 or start the centre with --nproc 1")
        if ranks.shard and ranks.world < 2:
            raise ValueError(f"centre {centre}: --shard splits the model over the centre's ranks and needs at least 2; "
                             "start the centre with --nproc 2 or more, or without --shard")
        if ranks.shard and cfg.overlap_steps:
            # The steps trained ahead add (end - start) of whole-model copies onto the global model.
            raise ValueError(f"centre {centre}: --shard does not support overlap-steps "
                             f"({cfg.overlap_steps}) yet; set overlap-steps = 0 or start the centre without --shard")
        if cfg.batch_size % ranks.world:
            raise ValueError(f"centre {centre}: batch-size {cfg.batch_size} does not split over its {ranks.world} "
                             f"ranks; set batch-size to a multiple of {ranks.world} or start the centre with "
                             "another --nproc")
        if ranks.rank == 0:
            # The worker chose the centre's threads; its ranks share them (one rank's share each).
            torch.set_num_threads(max(1, torch.get_num_threads() // ranks.world))
            with ranks.guard("building the run's model"):
                ranks.send(("build", cfg, torch.get_num_threads()))
        super().__init__(centre, data_dir, state_dir, cfg, ranks.rank, ranks.world,
                         speed=speed if ranks.rank == 0 else 1.0)
        if ranks.shard:
            # Every rank built the same model from the run's seed; its parameters become this rank's
            # shards, and the optimiser is built again over them (its moments are then shards too).
            self.model = self.net = shard(self.model, self.device.type, ranks.world)
            self.optim = self.model.configure_optimizer(cfg.inner_lr, cfg.inner_weight_decay, (0.9, 0.95))
        else:
            # Broadcasts rank 0's weights at construction; shared (tied) parameters are all-reduced once.
            # The GPT has no buffers, so DDP's buffer syncing costs nothing.
            gpu = [torch.cuda.current_device()] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=gpu)
        self._inside = False  # within a mirrored call: inner calls (train_ahead's load) stay local
        self._follower_ahead: Ahead | None = None

    def wire_tensors(self, landing: bool = False) -> None:
        """None: the other ranks must get the global model too, which `load_global` tells them."""
        return None

    # ------------------------------------------------------- rank 0's calls, mirrored
    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        if self.ranks.shard:  # rank 0's full model, scattered into every rank's shards
            with self.ranks.guard("the scatter of the global model"):
                self.ranks.send(("load",))
                load_full(self.model, state)
            self._local_round = -1
            return
        super().load_global(state)
        if self._inside or self.ranks.rank != 0:
            return
        with self.ranks.guard("the broadcast of the global model"):
            self.ranks.send(("load",))
            self._broadcast_weights()

    def evaluate(self) -> dict[str, float]:
        """Rank 0 alone with its whole model (DDP); with --shard every rank takes part in each forward
        (FSDP gathers each block's weights from the shards), on the same held-out batches."""
        if not self.ranks.shard:
            return super().evaluate()
        with self.ranks.guard("the evaluation"):
            self.ranks.send(("eval",))
            return super().evaluate()

    def train_ahead(self, next_round: int) -> Ahead | None:
        if self._inside:
            return super().train_ahead(next_round)
        with self.ranks.guard(f"round {next_round}'s steps ahead"), self._mirrored():
            self.ranks.send(("ahead", next_round))
            return super().train_ahead(next_round)

    def train_round(self, server_round: int, ahead: Ahead | None = None) -> RoundResult:
        with self.ranks.guard(f"round {server_round}"), self._mirrored():
            self.ranks.send(("train", server_round, ahead is not None))
            return self._train_round(server_round, ahead)

    # ------------------------------------------------------------------ every rank
    def _train_round(self, server_round: int, ahead: Ahead | None) -> RoundResult:
        result = super().train_round(server_round, ahead)
        m = result.metrics
        own = {"step-seconds-mean": m["step-seconds-mean"], "peak-memory-bytes": m["peak-memory-bytes"]}
        every: list[Any] = [None] * self.ranks.world
        dist.all_gather_object(every, (m["train-loss"], m["step-seconds-max"], own), group=self.ranks.commands)
        # The centre's figures: tokens and examples are already the whole batch's (batch-size is the
        # centre's), with its slowest step, its largest memory and the mean loss over the whole batch
        # (equal per-rank slices: the mean of the ranks' means).
        m["train-loss"] = sum(e[0] for e in every) / self.ranks.world
        m["step-seconds-max"] = max(e[1] for e in every)
        m["peak-memory-bytes"] = max(e[2]["peak-memory-bytes"] for e in every)
        result.ranks = [e[2] for e in every]
        return result

    def _full_state(self) -> dict[str, torch.Tensor]:
        return full_state(self.model) if self.ranks.shard else super()._full_state()  # {} on ranks > 0

    def _optim_to_disk(self) -> dict:
        return optim_local(self.optim.state_dict()) if self.ranks.shard else super()._optim_to_disk()

    def _optim_from_disk(self, state: dict) -> dict:
        return optim_sharded(state, self.optim) if self.ranks.shard else state

    def _broadcast_weights(self) -> None:
        """Rank 0's model into every rank's, in place (tied weights once)."""
        seen: set[int] = set()
        with torch.no_grad():
            for v in self.model.state_dict().values():
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    dist.broadcast(v, src=0)

    @contextmanager
    def _mirrored(self) -> Iterator[None]:
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    # ------------------------------------------------------------------ ranks > 0
    def follow_load(self) -> None:
        if self.ranks.shard:
            load_full(self.model, None)
        else:
            self._broadcast_weights()
        self._local_round = -1

    def follow_eval(self) -> None:
        super().evaluate()

    def follow_ahead(self, next_round: int) -> None:
        with self._mirrored():
            self._follower_ahead = super().train_ahead(next_round)

    def follow_train(self, server_round: int, with_ahead: bool) -> None:
        ahead, self._follower_ahead = (self._follower_ahead if with_ahead else None), None
        with self._mirrored():
            self._train_round(server_round, ahead)


class RankZeroWorker(CentreWorker):
    """The centre worker on rank 0: its trainers drive the other ranks; once a rank failed, it
    exits after replying (with the error naming the rank), for the agent to restart the ranks."""

    def __init__(self, ranks: Ranks, *args: Any, **kwargs: Any):
        super().__init__(*args, trainer_factory=lambda centre, data, state, cfg, speed=1.0: RankTrainer(
            centre, data, state, cfg, ranks, speed), **kwargs)
        self.ranks = ranks
        self._exiting = False

    def handle(self, header: dict[str, Any], arrays: Any, peer: int | None = None) -> tuple[dict[str, Any], Any]:
        if self.ranks.failed and header.get("op") == "vouch":  # the runtime's check of the error reply
            self._exiting = True
        return super().handle(header, arrays, peer)

    def after_reply(self) -> None:
        if self.ranks.failed:
            # The error naming the rank leaves only once the centre's runtime has checked it with this
            # worker (op "vouch"): exit after that, or after VOUCH_GRACE if it never comes.
            if self._exiting:
                raise SystemExit(f"[{self.centre}] {self.ranks.failed}")
            timer = threading.Timer(VOUCH_GRACE, os._exit, args=(1,))
            timer.daemon = True  # not a reason to outlive the SystemExit above
            timer.start()
            return
        super().after_reply()


def follow(ranks: Ranks, data_dir: Path, state_dir: Path, device: str = "") -> None:
    """A rank > 0: make rank 0's calls in step with it, until it says stop (or dies: then the
    failed collective raises and this process exits for the agent to restart the centre)."""
    trainer: RankTrainer | None = None
    while True:
        command = ranks.receive()
        op = command[0]
        if op == "stop":
            return
        if op == "build":
            cfg, threads = command[1], command[2]
            torch.set_num_threads(threads)
            trainer = None  # the previous run's model, freed before the next is built
            trainer = RankTrainer(ranks.centre, data_dir, state_dir, cfg.replace(device=device) if device else cfg,
                                  ranks)
            continue
        if trainer is None:
            raise RuntimeError(f"[{ranks.centre}] rank {ranks.rank}: command {op!r} before any run was built")
        if op == "load":
            trainer.follow_load()
        elif op == "eval":
            trainer.follow_eval()
        elif op == "ahead":
            trainer.follow_ahead(int(command[1]))
        elif op == "train":
            trainer.follow_train(int(command[1]), bool(command[2]))
        else:
            raise RuntimeError(f"[{ranks.centre}] rank {ranks.rank}: unknown command {op!r}")


def stop_followers(ranks: Ranks) -> None:
    """Rank 0 leaving on its own (SIGTERM, end of serve): let the other ranks leave too."""
    if ranks.rank == 0 and not ranks.failed:
        try:
            ranks.send(("stop",))
        except Exception as err:  # they may be gone already
            log.warning("[%s] could not tell the other ranks to stop: %s", ranks.centre, err)
