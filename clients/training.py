"""Local training at one national compute centre (pure torch, no Flower).

`CentreTrainer` is what a centre runs each round: load the global weights it was
sent, evaluate them on its own held-out split, run H inner AdamW steps on its own
training split, and return the new weights with measured figures. It is called
from the long-lived centre worker (clients/worker.py) or, without a worker,
directly inside a ClientApp.

Determinism: the batch at inner step s depends only on (seed, centre, s) and the
learning rate only on s, with s = (round - 1) * H + i for a fixed H. The inner optimiser state
is saved per round on the centre's own disk, so a round can be re-run (after a
coordinator restart) from exactly the state it started with.

Time budget (`round-seconds` = T > 0): a centre trains until its compute for the round
reaches T (at least `min-inner-steps`, at most `max-inner-steps`), so fast and slow
centres reply together and each contributes what it could; its tokens weight the mean.
Then s is the centre's own cumulative step count (`steps.json` on its disk: round ->
[first step, steps]), the batch still depends only on (seed, centre, s), and the
learning rate follows s on the schedule's nominal horizon, rounds x inner-steps: a fast
centre reaches the 10 % floor sooner and stays there, a slow one is still higher when
the run ends. A round this centre trained before (a restarted coordinator, a resumed
run) replays its recorded count instead of the clock, so the re-run is exact.
`speed` < 1 emulates a slower centre on the same machine: each step is followed by a
sleep of (1/speed - 1) x its time (counted as compute, as a slower device's would be).

Overlap (`overlap-steps` = k > 0): while the server aggregates round r, the centre
trains the first k steps of round r + 1 on its own model, where round r ended
(`train_ahead`). When the global model of round r + 1 arrives, that progress is
added onto it and the other H - k steps follow (`train_round(..., ahead)`): the
first k steps of every round see weights one outer step old. Those k steps are a
fixed number, so runs stay deterministic, and a restarted worker re-trains them
from the round's end saved on disk.

Overlap memory: one kept copy of the model (4 bytes per parameter, the tied weight twice),
reused every round. At the end of round r it holds where the round ended (the steps ahead
start there, and it is written to disk for a restart while the update travels); once the
steps ahead end, it holds their progress (end - start), so the model's own tensors are free
for round r + 1's global model to land in (clients/worker.py sends and lands in place).
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clients.data import TokenSampler, load_split
from clients.statefiles import inside, keep_file, run_state_dir, save_in_place
from models.background import BackgroundWrite
from models.config import RunConfig
from models.gpt import GPT, build_model

log = logging.getLogger("bridgepool.centre")
STEPS_FILE = "steps.json"  # time budget: round -> [first step, steps taken], every round of the run


@dataclass
class Ahead:
    """The first steps of `round`, trained on the centre's own model before that round's
    global model arrived (overlap): `delta` is their progress, end - start, per state-dict name
    (the trainer's kept copy, valid until its next round ends)."""

    round: int
    delta: dict[str, torch.Tensor]
    losses: list[torch.Tensor]
    step_seconds: list[float]
    compute: float


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # every inner step, for the metrics histogram
    ranks: list[dict[str, float]] = field(default_factory=list)  # per-rank figures of a multi-rank centre


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 on CPU (CPU bf16 matmuls are slow here)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def forward(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device,
            amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of a token batch on `device`, under bf16 autocast when `amp_dtype` is set."""
    xt = torch.from_numpy(x).to(device, non_blocking=True)
    yt = torch.from_numpy(y).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model(xt, yt)


def sync(device: torch.device) -> None:
    """Wait for the queued GPU kernels (honest timings on GPU; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_schedule(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then cosine from inner-lr down to 10 % over rounds x inner-steps. With a time
    budget `step` is the centre's own cumulative count and inner-steps the nominal H: a centre
    that takes more steps than that reaches the floor sooner and stays there."""
    total = cfg.rounds * cfg.inner_steps
    if step < cfg.inner_warmup_steps:
        return cfg.inner_lr * (step + 1) / cfg.inner_warmup_steps
    progress = min(1.0, (step - cfg.inner_warmup_steps) / max(1, total - cfg.inner_warmup_steps))
    return cfg.inner_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class CentreTrainer:
    """One centre's model, data and inner optimiser, kept warm across rounds."""

    def __init__(self, centre: str, data_dir: Path, state_dir: Path, cfg: RunConfig, rank: int = 0,
                 ranks: int = 1, speed: float = 1.0):
        """`rank` of `ranks`: this process's place in a multi-rank centre (clients/ranks.py), which
        picks its slice of each step's batch and its own inner-optimiser files; `speed` < 1: an
        emulated slower centre."""
        if not 0 < speed <= 1:
            raise ValueError(f"centre {centre}: speed must be in (0, 1] (1 = full speed, 1/3 = 3x slower), got {speed}")
        self.centre, self.cfg, self.speed = centre, cfg, speed
        self.state_root = Path(state_dir)
        self.state_dir = run_state_dir(self.state_root, cfg.run_name)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        inside(self.state_root, self.state_dir)  # again once it exists: a symlink created meanwhile
        self.device = resolve_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.model: GPT = build_model(cfg.model, seed=cfg.seed).to(self.device)
        self.seq_len = cfg.seq_len or self.model.config.block_size
        # A stable per-centre seed so centres see different windows of their own data.
        centre_seed = zlib.crc32(centre.encode()) ^ cfg.seed
        # batch-size is the centre's per inner step; with several ranks each trains its slice of it.
        self.train = TokenSampler(load_split(Path(data_dir), "train", centre), self.seq_len,
                                  cfg.batch_size // ranks, centre_seed, rank, ranks)
        self.valid = TokenSampler(load_split(Path(data_dir), "validation", centre), self.seq_len,
                                  cfg.batch_size, centre_seed)
        self.optim = self.model.configure_optimizer(cfg.inner_lr, cfg.inner_weight_decay, (0.9, 0.95))
        self.flops_per_token = self.model.flops_per_token()
        self.net: torch.nn.Module = self.model  # what the inner steps run through (DDP in clients/ranks.py)
        self.file_prefix = f"rank{rank}-" if rank else ""  # rank 0's files keep the single-process names
        self._optim_round = 0  # round whose inner-optimiser state self.optim holds
        # The worker writes the round's AdamW state (2x the model's bytes) while the update travels
        # (`background_save`), and waits for it before its reply vouches for the round (`flush`).
        self.background_save = False
        self._saving = BackgroundWrite(f"[{centre}] the inner-optimiser state")
        # overlap-steps: the kept copy (module docstring, "Overlap memory") and its write to disk
        self._kept: dict[str, torch.Tensor] | None = None
        if cfg.overlap_steps:  # allocated (and its pages touched) now, before round 1 rather than in it;
            # a tensor per name (a tied weight twice: the file on disk has both names, safetensors shares none)
            self._kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._saving_local = BackgroundWrite(f"[{centre}] the local model")
        self._local_round = 0  # round whose local end the model holds (-1: none, e.g. after train_ahead)
        # Bumped wherever the weights may change (loads, steps): a digest of them taken at one version
        # still holds while it lasts (clients/worker.py: round 1's seed model, hashed at `prepare`).
        self.weights_version = 0

    # ------------------------------------------------------------------ public
    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        self.weights_version += 1
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True)
        self._local_round = -1

    def wire_tensors(self, landing: bool = False) -> list[torch.Tensor] | None:
        """The model's tensors in the wire's order (models/packing.py: sorted names, a tied weight
        twice), for the data plane to send the update from and (`landing`) to write the round's model
        into, in place; None unless they are one whole model's, on the CPU, fp32 and contiguous.

        Landing, a tied weight's values are those of the name `load_state_dict` copies last (it copies
        in the state dict's order): its other names get a scratch tensor each, so the model is what
        `load_global` would make of the same vector even where the two copies differ (the coordinator
        keeps them apart, and DP's noise is drawn for each)."""
        if self.device.type != "cpu":
            return None
        state = self.model.state_dict()
        if not all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values()):
            return None
        last = {t.data_ptr(): k for k, t in state.items()}  # storage -> the name copied into it last
        return [state[k] if not landing or last[state[k].data_ptr()] == k else torch.empty_like(state[k])
                for k in sorted(state)]

    def loaded_in_place(self) -> None:
        """The round's global model was written into `wire_tensors` (what `load_global` does by copy)."""
        self.weights_version += 1
        self._local_round = -1

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean held-out loss of the currently loaded weights on this centre's validation split."""
        self.model.eval()
        t0, losses, tokens = time.perf_counter(), [], 0
        for x, y in self.valid.eval_batches(self.cfg.eval_batches):
            _, loss = self._forward(x, y)
            losses.append(float(loss))
            tokens += x.size
        sync(self.device)
        return {"eval-loss": float(np.mean(losses)), "eval-tokens": float(tokens),
                "eval-seconds": time.perf_counter() - t0}

    def train_round(self, server_round: int, ahead: Ahead | None = None) -> RoundResult:
        """H inner AdamW steps from the loaded weights; returns new weights and figures.

        With `ahead` (its round must be this one), its progress is added onto the loaded
        weights and only the steps after it are trained, continuing its optimiser state.
        """
        if ahead is None:
            self._load_optim(server_round - 1)
            done: list[torch.Tensor] = []
            done_seconds: list[float] = []
            done_compute = 0.0
        else:
            if ahead.round != server_round:
                raise ValueError(f"steps trained ahead for round {ahead.round} offered to round {server_round}")
            self._rebase(ahead)
            done, done_seconds, done_compute = ahead.losses, ahead.step_seconds, ahead.compute
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        first, replay = self._round_plan(server_round)
        t0 = time.perf_counter()
        if replay is None:  # the time budget decides how many steps
            losses, step_seconds = self._steps(first, 0, self.cfg.max_inner_steps, self.cfg.round_seconds)
        else:
            losses, step_seconds = self._steps(first, len(done), replay)
        compute = time.perf_counter() - t0 + done_compute
        H = len(done) + len(losses)
        if self.cfg.budgeted:
            self._record_steps(server_round, first, H)
        losses, step_seconds = done + losses, done_seconds + step_seconds
        train_loss = float(torch.stack(losses).float().mean())  # one sync, after the loop
        self._save_optim(server_round)
        if self.cfg.overlap_steps and server_round < self.cfg.rounds:
            self._keep_local(server_round)  # where the next round's early steps start, also after a restart
        tokens = H * self.cfg.batch_size * self.seq_len  # the weight of this centre's update in the mean
        return RoundResult(self._full_state(), {
            "train-loss": train_loss,
            "tokens": float(tokens),
            "num-examples": float(H * self.cfg.batch_size),
            "compute-seconds": compute,
            "tokens-per-second": tokens / compute,
            "step-seconds-max": max(step_seconds),
            "step-seconds-mean": float(np.mean(step_seconds)),
            "steps-ahead": float(len(done)),
            "inner-steps": float(H),
            "flops-per-token": float(self.flops_per_token),
            "peak-memory-bytes": float(self._peak_memory()),
        }, step_seconds)

    def train_ahead(self, next_round: int) -> Ahead | None:
        """The first `overlap-steps` steps of `next_round`, from where round next_round - 1
        ended: in memory right after train_round, else (a restarted worker, a re-sent round)
        from that round's end saved on disk. None if there is nothing to start from (round 1,
        overlap off, or a centre that did not train the previous round): then the round is
        trained whole from the global model."""
        k, prev = self.cfg.overlap_steps, next_round - 1
        if not k or prev < 1:
            return None
        if self._local_round != prev:
            self.flush()  # the round's files may still be being written (in the background)
            path = self._local_path(prev)
            if not path.exists() or not self._optim_path(prev).exists():
                log.warning("[%s] no local model after round %d (%s): round %d starts whole from the global model",
                            self.centre, prev, path, next_round)
                return None
            self.load_global(load_file(path))
            self._local_round = prev
            self._hold(prev)  # the kept copy is where the steps start
        self._load_optim(prev)
        self._optim_round = self._local_round = -1  # from here memory holds neither a round's end nor its moments
        t0 = time.perf_counter()
        losses, step_seconds = self._steps((next_round - 1) * self.cfg.inner_steps, 0, k)
        compute = time.perf_counter() - t0
        kept = self._kept
        assert kept is not None  # held by `_keep_local` or `_hold`: `_local_round` was prev
        with torch.no_grad():  # kept = end - start (as -start + end: the same float), in place
            for name, v in self.model.state_dict().items():
                kept[name].neg_().add_(v.detach())
        return Ahead(next_round, kept, losses, step_seconds, compute)

    def lr_at(self, step: int) -> float:
        return lr_schedule(step, self.cfg)

    # ----------------------------------------------------------------- private
    def _round_plan(self, server_round: int) -> tuple[int, int | None]:
        """(the round's first step s, its step count; None = until the time budget is spent).
        Fixed H: ((round - 1) x H, H). Time budget: s continues this centre's own count, and a
        round it has trained before (a re-sent or resumed round) replays its recorded count."""
        if not self.cfg.budgeted:
            return (server_round - 1) * self.cfg.inner_steps, self.cfg.inner_steps
        record = self._steps_record()
        if str(server_round) in record:
            first, steps = record[str(server_round)]
            return first, steps
        if server_round == 1:
            return 0, None
        if str(server_round - 1) not in record:
            # A centre joining mid-run (or one whose record was lost) starts at the nominal position.
            log.warning("[%s] no step record for round %d: round %d starts at step %d", self.centre,
                        server_round - 1, server_round, (server_round - 1) * self.cfg.inner_steps)
            return (server_round - 1) * self.cfg.inner_steps, None
        first, steps = record[str(server_round - 1)]
        return first + steps, None

    def _steps_path(self) -> Path:
        return inside(self.state_dir, self.state_dir / STEPS_FILE)

    def _steps_record(self) -> dict[str, list[int]]:
        path = self._steps_path()
        return json.loads(path.read_text()) if path.exists() else {}

    def _record_steps(self, server_round: int, first: int, steps: int) -> None:
        """Record the round's steps (whole file or nothing). Later rounds' entries stay: a re-run round
        replays its count, so what followed it (a resume from an older checkpoint) replays too."""
        record = self._steps_record()
        record[str(server_round)] = [first, steps]
        text = json.dumps(dict(sorted(record.items(), key=lambda kv: int(kv[0]))))
        keep_file(self.state_dir, self._steps_path(), lambda tmp: tmp.write_text(text))

    def _steps(self, first_step: int, first: int, last: int,
               budget: float = 0.0) -> tuple[list[torch.Tensor], list[float]]:
        """Inner steps first..last-1 of the round whose step 0 is `first_step`, on the model as it
        is. With `budget` > 0: stop earlier, once `min-inner-steps` are done and the next step would
        end more than half a step past `budget` seconds (by the mean step so far): the round's
        compute lands within half a step of the budget, not up to a whole (slow) step over it."""
        self.flush()  # the moments these steps change are on disk first
        self.weights_version += 1
        self.model.train()
        losses, step_seconds = [], []
        t0 = time.perf_counter()
        for i in range(first, last):
            if budget and i >= self.cfg.min_inner_steps:
                spent = time.perf_counter() - t0
                if spent + 0.5 * spent / max(1, i - first) >= budget:
                    break
            step = first_step + i
            for group in self.optim.param_groups:
                group["lr"] = self.lr_at(step)
            ts = time.perf_counter()
            x, y = self.train.batch(step)
            _, loss = forward(self.net, x, y, self.device, self.amp_dtype)
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optim.step()
            losses.append(loss.detach())
            sync(self.device)
            if self.speed < 1:  # emulated slower centre (see the module docstring)
                time.sleep((time.perf_counter() - ts) * (1 / self.speed - 1))
            step_seconds.append(time.perf_counter() - ts)
        self.optim.zero_grad(set_to_none=True)  # the last step's gradients: 4 bytes/param not held past the loop
        return losses, step_seconds

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The model's weights as the reply carries them: fp32 on CPU (a sharded centre gathers them)."""
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}

    def _optim_to_disk(self) -> dict:
        return self.optim.state_dict()  # a sharded centre saves each rank's shard (clients/shard.py)

    def _optim_from_disk(self, state: dict) -> dict:
        return state

    @torch.no_grad()
    def _rebase(self, ahead: Ahead) -> None:
        """Add the steps trained ahead onto the global model just loaded: w = global + (end - start)."""
        self.weights_version += 1
        seen: set[int] = set()
        for k, v in self.model.state_dict().items():
            if v.data_ptr() not in seen:  # tied weights (wte = lm_head) appear twice: add once
                seen.add(v.data_ptr())
                v.add_(ahead.delta[k])

    def _local_path(self, server_round: int) -> Path:
        return inside(self.state_dir, self.state_dir /
                      f"{self.file_prefix}local-model-round-{server_round:04d}.safetensors")

    @torch.no_grad()
    def _hold(self, server_round: int) -> None:
        """The model (where round `server_round` ended) into the kept copy (allocated in __init__)."""
        assert self._kept is not None  # overlap-steps is set: the only caller's condition
        self._saving_local.wait()  # the copy's last write has read it
        for k, v in self.model.state_dict().items():
            self._kept[k].copy_(v.detach())
        self._local_round = server_round

    def _keep_local(self, server_round: int) -> None:
        """Hold where the round ended, and write it to disk for a restarted worker, in the background
        (from the kept copy, which nothing changes before `flush`: the reply waits for it)."""
        self._hold(server_round)
        kept, path = self._kept, self._local_path(server_round)
        assert kept is not None
        self._saving_local.start(lambda: keep_file(self.state_dir, path, lambda tmp: save_file(
            {k: v.cpu() for k, v in kept.items()}, tmp)))

    def _forward(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(self.model, x, y, self.device, self.amp_dtype)

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource  # CPU: the process's peak RSS (KiB on Linux)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _optim_path(self, server_round: int) -> Path:
        return inside(self.state_dir, self.state_dir / f"{self.file_prefix}inner-optim-round-{server_round:04d}.pt")

    def flush(self) -> None:
        """Wait until the inner-optimiser state of the last round is on disk; its error, if any.
        A reply must not leave before: a centre restarted after the server took its update resumes
        from that file, so resume stays bit-identical (with overlap-steps, also the round's local end)."""
        self._saving.wait()
        self._saving_local.wait()

    def _load_optim(self, after_round: int) -> None:
        """Restore the inner AdamW state saved after `after_round` (DiLoCo keeps it).

        Skipped when this process already holds it (the warm worker's usual case).
        """
        self.flush()
        if self._optim_round == after_round:
            return
        path = self._optim_path(after_round)
        if after_round >= 1 and path.exists():
            self.optim.load_state_dict(self._optim_from_disk(torch.load(path, map_location=self.device,
                                                                        weights_only=True)))
        else:  # round 1, or a centre joining mid-run: fresh moments
            if after_round >= 1:
                log.warning("[%s] no inner-optimiser state after round %d (%s): starting round %d with "
                            "fresh AdamW moments", self.centre, after_round, path, after_round + 1)
            self.optim.state.clear()
        self._optim_round = after_round

    def _save_optim(self, server_round: int) -> None:
        self.flush()
        if not self.cfg.checkpointed(server_round):
            # Resume starts from a coordinator checkpoint, and those are the only rounds it has (checkpoint-every):
            # 1 GB of AdamW moments for `base`, written each round, is disk traffic that every transfer and
            # the ledger's fsync wait behind. The moments stay in memory for the next round as they are.
            self._optim_round = server_round
            return
        # Taken now: its tensors are the live moments (each rank's shard with --shard), which only the
        # next steps change, and those flush first (`_load_optim`, `_steps`).
        state, path = self._optim_to_disk(), self._optim_path(server_round)
        position = None if self.file_prefix else {  # one position per centre: rank 0 writes it
            "round": server_round, "next-step": self._round_plan(server_round + 1)[0]}
        self._optim_round = server_round

        def write() -> None:
            keep_file(self.state_dir, path, lambda tmp: save_in_place(state, tmp), recycle=True,
                      keep=self.cfg.checkpoint_keep)
            if position is not None:
                inside(self.state_dir, self.state_dir / "position.json").write_text(json.dumps(position))

        self._saving.start(write)
        if not self.background_save:
            self.flush()
