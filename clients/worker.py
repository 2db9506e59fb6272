"""The centre worker: one long-lived process per national compute centre.

Flower starts a fresh ClientApp process for every message, so anything it holds
is lost each round (and importing torch alone costs seconds). The worker keeps
the model, the memory-mapped data and the inner optimiser warm across rounds;
the ClientApp only relays arrays to it over a local Unix socket (clients/socketserve.py).

The worker is the centre operator's installed code, started by the operator
(or `bridgepool demo`), with its identity and data directory on its own command
line: a submitted app cannot point it at another directory.

It is also where the egress guard runs (clients/egress.py): every reply is
checked against the model's parameter manifest and the metric allow-list, and
recorded in STATE_DIR/egress-ledger.jsonl, before it leaves this process.

    bridgepool centre serve --centre fr-genci --data-dir D --state-dir S --socket S/worker.sock
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients import dataplane, wire
from clients.broadcast import HeldBase, StaleBase
from clients.data import load_split
from clients.egress import (
    LEDGER_NAME,
    EgressBlocked,
    EgressGuard,
    Manifest,
    content_digest,
    describe_blob,
    describe_worker_reply,
    reply_records,
)
from clients.metrics import CentreMetrics, Peak, device_peak
from clients.policy import Gate, Policy
from clients.priority import lower_priority
from clients.runs import BOOK_NAME, RunBook, RunRefused
from clients.training import Ahead, CentreTrainer, autocast_dtype
from clients.weights import Phases, broadcast_manifest, landed, own_weights, weights_digest, wire_manifest
from models import blob
from models.config import RunConfig
from models.gpt import build_model, parameter_manifest
from models.packing import (
    BF16_KEY,
    FORM_KEY,
    FULL,
    NEW_SHA_KEY,
    PARAMS_KEY,
    SEED,
    STALE_BASE_METRIC,
    pack,
    pack_bf16_bits,
    quantize_int8,
    to_bf16_bits,
    unpack,
)

log = logging.getLogger("bridgepool.centre")
VOUCHED = 64  # replies and error texts remembered for the runtime's check: a few rounds' worth
TrainerFactory = Callable[..., CentreTrainer]  # (centre, data dir, state dir, config, speed=) -> trainer
TICKETED = ("prepare", "train", "evaluate", "egress-check")  # a run's requests: each names its task's ticket


class CentreWorker:
    """Turns relayed requests into CentreTrainer calls; usable in-process too."""

    def __init__(self, centre: str, data_dir: Path, state_dir: Path, threads: int = 0, nice: int = 0,
                 metrics: CentreMetrics | None = None, policy: Policy | None = None,
                 destination: dataplane.Destination | None = None, device: str = "",
                 trainer_factory: TrainerFactory = CentreTrainer, speed: float = 1.0, run_ids: bool = False):
        self.centre, self.data_dir, self.state_dir = centre, Path(data_dir), Path(state_dir)
        # With run_ids (`centre serve --require-run-ids`, set by the launchers, whose runtime admits each
        # task): a run-name's state belongs to the SuperLink run id it was first admitted for (clients/runs.py).
        self.runs = RunBook(self.state_dir / BOOK_NAME) if run_ids else None
        # Where model bytes may go on the data plane: the operator's choice (`centre serve --coordinator`).
        self.destination = destination or dataplane.Destination()
        self._uploads: dict[tuple[str, int, str], str] = {}  # (run, round, op) -> SHA-256 of the sent manifest
        # What this worker produced and may therefore leave the centre as a Flower reply: digests of
        # reply contents and the texts of error replies. The centre's runtime asks before it sends
        # (op "vouch"); each is good once, and only the newest VOUCHED are kept.
        self._vouched: dict[str, None] = {}
        self._vouched_errors: dict[str, None] = {}
        self.phases = Phases()  # the last request's
        self.plane_bytes = [0, 0]  # this request's bytes on the data plane: received, sent (for the metrics)
        self.threads = threads
        self.device = device  # this centre's device over the run config's ("" = the run config's)
        self.trainer_factory = trainer_factory  # a multi-rank centre's (clients/ranks.py) drives its other ranks
        self.speed = speed  # < 1: an emulated slower centre (clients/training.py), the operator's setting
        self.metrics = metrics or CentreMetrics(centre)  # recorded always, served only with a port
        self._peak = Peak(0.0, "unknown")  # set when a run's model is built
        self.egress = EgressGuard(centre, self.state_dir / LEDGER_NAME, on_blocked=self.metrics.record_egress_blocked)
        self._manifest: Manifest = {}  # what may leave: the current run's parameters as they travel
        # The operator's policy (clients/policy.py), not the run's: refusals go to the ledger.
        self.policy = policy or Policy()
        self.gate = Gate(self.policy, self.egress.refused)
        if nice:
            # When centres share a machine with the federation's own processes (the demo),
            # training yields the CPU to message handling and aggregation, which otherwise wait behind it.
            lower_priority(nice)
        self._trainer: CentreTrainer | None = None
        self._config: dict[str, Any] | None = None
        self.held = HeldBase()  # the broadcast model the server last delivered (clients/broadcast.py)
        # (trainer, its weights_version, the SHA-256 of its weights as packed) when `prepare` built it:
        # round 1's seed model is then known without packing or hashing it again (`_holds_seed`).
        self._seed: tuple[CentreTrainer, int, str] | None = None
        self._bf16: np.ndarray | None = None  # the run's buffer for an update rounded to bf16 (_lay_out)
        # The next round's first steps, trained while the server aggregates, and the trainer (run) they belong to.
        self._ahead: tuple[CentreTrainer, Ahead | None] | None = None
        self._ahead_thread: threading.Thread | None = None
        # The next round's model, pulled into the model's tensors once a train reply has left, with a read
        # the server granted ahead (`dp-next`): (trainer, landing tensors, url, token) until it starts, then
        # (trainer, the manifest it was served with, its seconds) once it landed whole.
        self._prefetch_plan: tuple[CentreTrainer, blob.Pieces, str, str] | None = None
        self._prefetch_thread: threading.Thread | None = None
        self._prefetched: tuple[CentreTrainer, list[blob.Entry], float] | None = None
        self._next_round = 0  # after a train reply: the round to train ahead for (0 = none)
        # Fail at start-up, naming the centre, rather than in round 1.
        for split in ("train", "validation"):
            load_split(self.data_dir, split, centre)

    def handle(self, header: dict[str, Any], arrays: wire.Arrays,
               peer: int | None = None) -> tuple[dict[str, Any], wire.Arrays]:
        """One request; `peer`: the uid at the socket's other end (None: a caller in this process)."""
        op = header.get("op")
        self.phases = Phases()
        if op == "ping":
            return {"status": "ok", "centre": self.centre}, {}
        if op == "vouch":  # the runtime, before it sends a Flower reply: not a request of the run's
            return self._answer_vouch(header), {}
        if op in ("admit", "release"):  # the runtime, around a task: before and after the run's app
            return self._runtime_op(str(op), header, peer), {}
        self._check_ticket(header)
        self.gate.admit(header)  # the centre's policy: raises PolicyRefused (in the ledger) before any work
        self.phases.mark("admit")
        if op == "egress-check":
            reply = self._egress_check(header)
            self.phases.mark("guard")
            return reply, {}
        prefetched = self._join_prefetch()  # nothing else may touch the model while the next one lands in it
        self.phases.mark("ahead-wait")
        if op == "prepare":  # before round 1: build the model, read the data, so round 1 starts warm
            trainer = self._trainer_for(header["run-config"])
            digest = weights_digest(trainer)  # ~0.4 s for base, before round 1 rather than in it
            self._seed = (trainer, trainer.weights_version, digest) if digest else None
            return self._reply(trainer, header, {}, {})
        if op not in ("train", "evaluate"):
            raise ValueError(f"unknown op {op!r}")
        ahead_of = self._join_ahead()  # the model is the background steps' until they end
        trainer = self._trainer_for(header["run-config"])
        ahead = ahead_of[1] if ahead_of is not None and ahead_of[0] is trainer else None
        if op != "train":
            ahead = None
        elif ahead is None or ahead.round != int(header["round"]):
            # Not trained ahead in the background (or for another round): now, before the round's model
            # lands (in the model's own tensors, on the data plane); kept for a stale-base retry.
            ahead = trainer.train_ahead(int(header["round"]))
            ahead_of = (trainer, ahead) if ahead is not None else None
        self.phases.mark("ahead-wait")
        plane = header.get("data-plane") or {}
        seeded = self._holds_seed(trainer, header)
        in_place = self._in_place(trainer, header, plane, seeded=seeded)
        if plane.get("manifest"):  # the round's model is on the coordinator's data plane: pull it
            landing = self._in_place(trainer, header, plane, landing=True)
            if landing is not None and landed(prefetched, trainer, str(plane["manifest"])):
                arrays = {}  # pulled ahead, and it is the model this message announces, digest for digest
                self.phases.seconds["pulled-ahead"] = prefetched[2]  # the download's time, before the message
            else:
                if landing is not None:  # from here the model is the download's, whole or (failing) in part
                    trainer.loaded_in_place()
                arrays = dataplane.fetch(self.destination, str(plane["url"]), str(plane["token"]),
                                         str(plane["manifest"]), broadcast_manifest(self._manifest), into=landing)
            self.plane_bytes[0] += landing.nbytes if landing is not None else sum(a.nbytes for a in arrays.values())
        sent: np.ndarray | None = None
        if seeded and in_place is not None:  # round 1: the model is the seed's, as hashed at `prepare`
            self.held.vector, self.held.sha = None, str(header["broadcast"][NEW_SHA_KEY])
        elif in_place is None or not plane.get("manifest"):  # else: the global model landed in the model's tensors
            try:
                cfg = trainer.cfg
                # Round 1's seed model: the trainer's own, built from the seed by `prepare` and not changed since
                # (its hash says so), saves building another (1.75 s for base on one core); else a new one.
                sent = self.held.receive(header.get("broadcast", {}), arrays,
                                         [lambda: own_weights(trainer),
                                          lambda: pack(build_model(cfg.model, seed=cfg.seed).state_dict())])
                arrays = {}  # `sent` (and the held copy, for int8) keep what is needed of them
            except StaleBase as err:  # the server sends the full weights in reply
                log.warning("[%s] %s round %s: %s; asking the server for the full weights", self.centre, op,
                            header["round"], err)
                self._ahead = ahead_of  # still good for the same round, once the full weights come
                return self._reply(trainer, header, {STALE_BASE_METRIC: 1.0}, {})
            # Views of `sent`, copied once, into the model (not a second full copy on the way).
            trainer.load_global(unpack(sent, trainer.model.state_dict(), copy=False))
        self.phases.mark("fetch")
        if trainer.cfg.compression != "int8":  # only int8 deltas apply to the held copy: 4 bytes/param freed
            self.held.vector = None
        metrics = trainer.evaluate()  # the model it was sent, on its own held-out split
        self.phases.mark("eval")
        self.metrics.record_eval(trainer.cfg.run_name, metrics)
        out: wire.Arrays = {}
        if op == "train":
            rnd = int(header["round"])
            if trainer.cfg.compression != "int8" and self.policy.update_clip <= 0:
                sent = None  # not needed past here (int8 and the policy's clip take the update against it)
            result = trainer.train_round(rnd, ahead)
            self.phases.mark("train")
            self._next_round = rnd + 1 if trainer.cfg.overlap_steps and rnd < trainer.cfg.rounds else 0
            self.metrics.record_train(trainer.cfg.run_name, result.metrics, result.step_seconds, self._peak,
                                      result.ranks)
            metrics.update(result.metrics)
            if in_place is not None:  # sent from the model's own tensors
                out = self._lay_out(trainer, in_place)
            else:
                new = self.policy.privatise(sent, pack(result.state))  # the policy's clip + noise, if set
                if trainer.cfg.compression == "int8":
                    # Send the pseudo-gradient (old - new, old = the model it was sent), quantised: ~0.25 x the bytes.
                    out = quantize_int8(sent - new)
                elif trainer.cfg.wire_dtype == "bf16":  # the new weights rounded to bf16: half the bytes
                    out = {BF16_KEY: to_bf16_bits(new)}
                else:
                    out = {PARAMS_KEY: new}
            self.phases.mark("pack")
        reply, out = self._reply(trainer, header, metrics, out)
        if (op == "train" and in_place is not None and plane.get("next") and "upload" in reply
                and not trainer.cfg.overlap_steps):  # with overlap the model trains ahead meanwhile
            # The update has left and the state is written: nothing needs this model any more, so the next
            # round's can land in it while the server aggregates and Flower brings the round's message.
            # (After round 1 too: the seed model was trained in place, and the next model is the full weights.)
            landing = self._in_place(trainer, header, plane, landing=True, seeded=seeded)
            if landing is not None:
                self._prefetch_plan = (trainer, landing, str(plane["url"]), str(plane["next"]))
        return reply, out

    def _holds_seed(self, trainer: CentreTrainer, header: dict[str, Any]) -> bool:
        """Whether the message announces the run's seed model (round 1) and `trainer`'s weights are
        it: the digest `prepare` took of them, their version unchanged since."""
        announced = header.get("broadcast") or {}
        if announced.get(FORM_KEY) != SEED or self._seed is None:
            return False
        built, version, digest = self._seed
        return built is trainer and version == trainer.weights_version and digest == announced.get(NEW_SHA_KEY)

    def _in_place(self, trainer: CentreTrainer, header: dict[str, Any], plane: dict[str, Any],
                  landing: bool = False, seeded: bool = False) -> blob.Pieces | None:
        """The model's own tensors, for the data plane to land the round's model in and send the update
        from, where nothing else needs the model it was sent: a 0.5 GB model is then neither buffered
        (4 bytes per parameter, and ~0.5 s of page faults per fresh buffer on a 2-core machine) nor
        copied in and packed out (with overlap-steps too: the steps ahead keep their progress in the
        trainer's own copy, clients/training.py). Not with int8 (the update is taken against the model
        sent), the policy's clip, a broadcast other than the full weights (or, `seeded`, the seed model
        the trainer holds), or a trainer whose tensors are not one whole CPU fp32 model."""
        cfg = trainer.cfg
        forms = (FULL, SEED) if seeded else (FULL,)
        if (not plane.get("token") or cfg.compression == "int8" or self.policy.update_clip > 0
                or (header.get("broadcast") or {}).get(FORM_KEY, FULL) not in forms):
            return None
        tensors = trainer.wire_tensors(landing)  # landing: a tied weight's values land once (wire_tensors)
        return blob.Pieces(tuple(t.numpy() for t in tensors)) if tensors else None

    def _lay_out(self, trainer: CentreTrainer, model: blob.Pieces) -> wire.Arrays:
        """The round's update: the model's own tensors (fp32), or their bf16 rounding in a buffer
        kept for the run (2 bytes per parameter, mapped once)."""
        if trainer.cfg.wire_dtype != "bf16":
            return {PARAMS_KEY: model}
        if self._bf16 is None or self._bf16.size != model.shape[0]:
            self._bf16 = np.empty(model.shape[0], np.uint16)
        return {BF16_KEY: pack_bf16_bits(trainer.model.state_dict(), self._bf16)}

    def after_reply(self) -> None:
        """Once a train reply has left: train the next round's first steps in the background
        (overlap-steps), so the centre computes while the server aggregates. The next train
        or evaluate request waits for them; pings and egress checks do not."""
        plan, self._prefetch_plan = self._prefetch_plan, None
        if plan is not None:
            self._prefetch_thread = threading.Thread(target=self._prefetch, args=plan, name="prefetch", daemon=True)
            self._prefetch_thread.start()
        rnd, self._next_round = self._next_round, 0
        if rnd and self._trainer is not None:
            trainer = self._trainer
            self._ahead_thread = threading.Thread(target=self._train_ahead, args=(trainer, rnd),
                                                  name=f"ahead-{rnd}", daemon=True)
            self._ahead_thread.start()

    def _prefetch(self, trainer: CentreTrainer, landing: blob.Pieces, url: str, token: str) -> None:
        try:
            trainer.loaded_in_place()  # from here the model is the download's, whole or in part
            t0 = time.perf_counter()
            entries = dataplane.fetch_ahead(self.destination, url, token, broadcast_manifest(self._manifest), landing)
            self._prefetched = (trainer, entries, time.perf_counter() - t0)
        except Exception as err:  # the round's message then fetches it with its own token
            log.info("[%s] the next round's model was not pulled ahead: %s", self.centre, err)
            self._prefetched = None

    def _join_prefetch(self) -> tuple[CentreTrainer, list[blob.Entry], float] | None:
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
            self._prefetch_thread = None
        prefetched, self._prefetched = self._prefetched, None
        return prefetched

    def _train_ahead(self, trainer: CentreTrainer, rnd: int) -> None:
        try:
            self._ahead = (trainer, trainer.train_ahead(rnd))
        except Exception:  # the round is then trained whole when it comes
            log.exception("[%s] training ahead for round %d failed", self.centre, rnd)
            self._ahead = None

    def _join_ahead(self) -> tuple[CentreTrainer, Ahead | None] | None:
        if self._ahead_thread is not None:
            self._ahead_thread.join()
            self._ahead_thread = None
        ahead, self._ahead = self._ahead, None
        return ahead

    def _reply(self, trainer: CentreTrainer, header: dict[str, Any], metrics: dict[str, float],
               out: wire.Arrays) -> tuple[dict[str, Any], wire.Arrays]:
        reply: dict[str, Any] = {"status": "ok", "centre": self.centre, "metrics": metrics}
        run, rnd, op = trainer.cfg.run_name, int(header["round"]), str(header.get("op"))
        plane = header.get("data-plane") or {}
        if out and plane.get("token"):
            reply = self._upload(reply, out, plane, run, rnd, op)
            self.phases.mark("send")
            trainer.flush()
            self.phases.mark("state-write")  # the part of the optimiser state's write the update did not hide
            self.vouch(content_digest(reply_records(reply, {})))
            return reply, {}
        trainer.flush()
        # Raises EgressBlocked (so nothing but the error is sent) if the reply breaks a rule.
        self.egress.check(describe_worker_reply(reply, out), self._manifest, run=run, round=rnd, op=op,
                          stage="worker-reply")
        self.vouch(content_digest(reply_records(reply, out)))
        return reply, out

    def _runtime_op(self, op: str, header: dict[str, Any], peer: int | None) -> dict[str, Any]:
        """`admit`: a ticket for the task of SuperLink run `run-id` (clients/runs.py), or RunRefused, named
        in the ledger; `release`: the task ended. Only the runtime's user (or root) may ask: the run's app
        runs as another (--app-user), so it cannot admit itself."""
        if peer is not None and peer not in (0, os.getuid()):
            raise RunRefused(f"op {op!r} is the centre runtime's, not uid {peer}'s")
        ok = {"status": "ok", "centre": self.centre}
        if self.runs is None:  # run ids not required (a worker without the launchers' runtime)
            return ok
        if op == "release":
            self.runs.release(header.get("ticket"))
            return ok
        cfg = RunConfig.from_mapping(header["run-config"])
        try:
            return {**ok, "ticket": self.runs.admit(cfg.run_name, int(header["run-id"]), cfg.resume)}
        except RunRefused as err:
            self.egress.refused(run=cfg.run_name, round=int(header.get("round", 0)),
                                op=str(header.get("reply-to"))[:16],
                                reasons=[str(err)], stage="run-id")
            raise

    def _check_ticket(self, header: dict[str, Any]) -> None:
        """A run's request must carry its task's ticket and name that task's run (RunRefused, in the ledger)."""
        if self.runs is None or header.get("op") not in TICKETED:
            return
        run_config = header.get("run-config")
        run = str(run_config.get("run-name", "?"))[:64] if isinstance(run_config, dict) else "?"
        try:
            self.runs.check(header.get("ticket"), run)
        except RunRefused as err:
            self.egress.refused(run=run, round=int(header.get("round", 0)), op=str(header.get("op"))[:16],
                                reasons=[str(err)], stage="run-id")
            raise

    def vouch(self, claim: str, error: bool = False) -> None:
        """Remember a reply (its content digest) or an error text this worker produced."""
        book = self._vouched_errors if error else self._vouched
        book[claim] = None
        while len(book) > VOUCHED:
            del book[next(iter(book))]

    def _answer_vouch(self, header: dict[str, Any]) -> dict[str, Any]:
        """Is the Flower reply the runtime is about to send one this worker produced? A digest (or
        error text) it did not produce is recorded in the ledger as blocked (stage `runtime`) and
        refused: the runtime then sends an error reply in its own words in its place."""
        error = "error" in header
        claim = str(header["error"] if error else header.get("digest", ""))
        book = self._vouched_errors if error else self._vouched
        run, op = str(header.get("run-name", ""))[:64], str(header.get("reply-to", "unknown"))[:16]
        rnd = int(header.get("round", 0))
        if claim in book:
            del book[claim]
            self.egress.runtime(run=run, round=rnd, op=op)
            return {"status": "ok", "centre": self.centre}
        what = "an error text" if error else "a reply"
        fingerprint = hashlib.sha256(claim.encode()).hexdigest()[:16]
        self.egress.runtime(run=run, round=rnd, op=op,
                            problem=f"{what} this worker did not produce (sha256 {fingerprint})")
        raise EgressBlocked(f"the centre's runtime withheld {what} of the {op} reply that its worker did not "
                            "produce (recorded in the egress ledger, stage runtime)")

    def _upload(self, reply: dict[str, Any], out: wire.Arrays, plane: dict[str, Any], run: str, rnd: int,
                op: str) -> dict[str, Any]:
        """Send `out` on the data plane, this worker being the centre's only exit for model bytes: the guard
        checks it against the model's manifest and the ledger holds each array's size and SHA-256 before a
        byte leaves. The reply the ClientApp relays carries only the manifest (`upload`)."""
        entries = blob.layout(out, {BF16_KEY: blob.BF16})  # hashed once, here; the server checks them on arrival
        self.phases.mark("hash")
        manifest = blob.to_json(entries)
        reply["upload"] = manifest
        message = {**describe_worker_reply(reply, {}), "arrays": describe_blob(entries)}
        sha = hashlib.sha256(manifest.encode()).hexdigest()
        url = str(plane["url"])
        self.egress.check(message, self._manifest, run=run, round=rnd, op=op, stage="data-plane", upload=sha,
                          destination=url)
        self.phases.mark("guard")  # the ledger's line is on disk (fsync) before a byte leaves
        try:
            self.plane_bytes[1] += dataplane.upload(self.destination, url, str(plane["token"]), out, entries)
        except dataplane.DataPlaneError as err:
            if err.status != 410:
                raise
            # A late reply to a round the server has closed: it is not needed, but the reply still tells
            # the server this centre is alive (server/liveness.py).
            log.warning("[%s] %s", self.centre, err)
            del reply["upload"]
            return reply
        self._uploads = {k: v for k, v in self._uploads.items() if k[1] >= rnd - 1}  # bounded: recent rounds
        self._uploads[(run, rnd, op)] = sha
        return reply

    def _egress_check(self, header: dict[str, Any]) -> dict[str, Any]:
        """The ClientApp shell's final Flower reply, described (forms and hashes, no values),
        checked by the same guard before the shell may return it."""
        trainer = self._trainer_for(header["run-config"])
        replied = header.get("reply-to")
        op = replied if replied in ("train", "evaluate", "prepare") else "unknown"  # no free text
        rnd = int(header["round"])
        self.egress.check(header["message"], self._manifest, run=trainer.cfg.run_name, round=rnd, op=str(op),
                          stage="flower-reply", upload=self._uploads.get((trainer.cfg.run_name, rnd, str(op))))
        return {"status": "ok", "centre": self.centre}

    def _trainer_for(self, run_config: dict[str, Any]) -> CentreTrainer:
        if self._trainer is None or run_config != self._config:
            cfg = RunConfig.from_mapping(run_config)
            cfg = cfg.replace(device=self.device) if self.device else cfg
            torch.set_num_threads(self.threads or cfg.threads or
                                  max(1, (os.cpu_count() or 1) // cfg.expected_centres))
            if self._trainer is not None:
                self._trainer.flush()  # the last run's state is written before its trainer goes
            self._trainer = self.trainer_factory(self.centre, self.data_dir, self.state_dir, cfg, speed=self.speed)
            self._trainer.background_save = True  # flushed before every reply (`_reply`)
            self._config = dict(run_config)
            self.held = HeldBase()  # a new run (or a resumed one): the server sends what it needs
            self._bf16 = None
            self._manifest = wire_manifest(parameter_manifest(self._trainer.model))
            device = self._trainer.device
            self._peak = device_peak(device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                                     autocast_dtype(cfg.precision, device) is not None, torch.get_num_threads())
            self.metrics.start_run(cfg.run_name)
            log.info("[%s] built %s model (%d params) for run %s", self.centre, cfg.model,
                     self._trainer.model.num_params(), cfg.run_name)
        return self._trainer
