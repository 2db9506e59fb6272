"""A hostile centre, for the fault tests only: a CentreWorker whose training replies are poisoned.

It lives under tests/ and is started by the test itself in place of `bridgepool centre
serve` (same flags), so production code carries no switch that could poison anything.
Round r sends POISONS[(r - 1) % len(POISONS)]:

    python -m tests.hostile_worker --centre C --data-dir D --state-dir S --socket S/worker.sock
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from clients import wire
from clients.socketserve import serve
from clients.worker import CentreWorker
from models.packing import PARAMS_KEY

# Each is caught by a different check of server/validation.py (the comment names the reason code).
POISONS = ("nan", "norm", "huge", "dtype", "extra-key", "short")


def poison(kind: str, trained: np.ndarray, sent: np.ndarray) -> wire.Arrays:
    """The reply a hostile centre sends instead of `trained` (the global model it got was `sent`)."""
    out = trained.copy()
    if kind == "nan":  # non-finite
        out[::97] = np.nan
    elif kind == "norm":  # norm-outlier: a real update scaled 50x, every value still small
        out = sent + 50.0 * (trained - sent)
    elif kind == "huge":  # too-large
        out[: out.size // 2] = 1e30
    elif kind == "dtype":  # dtype
        return {PARAMS_KEY: out.astype(np.float64)}
    elif kind == "extra-key":  # keys
        return {PARAMS_KEY: out, "backdoor": np.ones(4, dtype=np.float32)}
    elif kind == "short":  # shape
        return {PARAMS_KEY: out[:-1]}
    else:
        raise ValueError(f"unknown poison {kind!r}")
    return {PARAMS_KEY: out.astype(np.float32)}


class HostileWorker(CentreWorker):
    def handle(self, header: dict[str, Any], arrays: wire.Arrays,
               peer: int | None = None) -> tuple[dict[str, Any], wire.Arrays]:
        sent = arrays.get(PARAMS_KEY)  # the model it was sent (the worker keeps no copy without int8)
        reply, out = super().handle(header, arrays, peer)
        if header.get("op") != "train" or PARAMS_KEY not in out:
            return reply, out
        kind = POISONS[(int(header["round"]) - 1) % len(POISONS)]
        logging.getLogger("bridgepool.centre").warning("[%s] round %s: sending a %s update",
                                                      self.centre, header["round"], kind)
        return reply, poison(kind, out[PARAMS_KEY], sent if sent is not None else out[PARAMS_KEY])

    def _egress_check(self, header: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok", "centre": self.centre}  # a hostile centre has switched its egress guard off

    def _answer_vouch(self, header: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok", "centre": self.centre}  # and vouches for whatever its runtime is about to send


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--centre", "--data-dir", "--state-dir", "--socket"):
        p.add_argument(flag, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--metrics-port", type=int, default=0)  # accepted like `centre serve`'s, not served
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--require-run-ids", action="store_true")  # as `centre serve`'s: tasks admitted by run id
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    worker = HostileWorker(args.centre, Path(args.data_dir), Path(args.state_dir), args.threads, args.nice,
                           run_ids=args.require_run_ids)
    serve(worker, Path(args.socket))


if __name__ == "__main__":
    main()
