"""Flower ClientApp: a thin shell between Flower messages and the centre's worker.

Node identity comes from `--node-config`:
  centre="fr-genci" worker-socket="/path/worker.sock"          (warm worker, default)
  centre="fr-genci" data-dir="/path/data" state-dir="/path/st"  (train in this process)
With a worker, this process never imports torch: it relays numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import wire

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _relay("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _relay("evaluate", msg, context)


def _relay(op: str, msg: Message, context: Context) -> Message:
    node = context.node_config
    centre = str(node.get("centre", f"node-{context.node_id}"))
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    header = {
        "op": op,
        "round": int(msg.content["config"]["server-round"]),
        "run-config": dict(context.run_config),
    }
    if "worker-socket" in node:
        reply, out = wire.call(str(node["worker-socket"]), header, arrays)
    else:
        reply, out = _in_process(centre, node, header, arrays)
    content = RecordDict({
        "metrics": MetricRecord({k: float(v) for k, v in reply["metrics"].items()}),
        "centre": ConfigRecord({"name": centre}),
    })
    if out:
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})
    return Message(content=content, reply_to=msg)


def _in_process(centre: str, node: Any, header: dict, arrays: wire.Arrays) -> tuple[dict, wire.Arrays]:
    """No worker configured: train here (slower: torch import and set-up every round)."""
    from pathlib import Path

    from clients.worker import CentreWorker

    for key in ("data-dir", "state-dir"):
        if key not in node:
            raise ValueError(f"centre {centre}: --node-config needs worker-socket=... or {key}=...")
    worker = CentreWorker(centre, Path(str(node["data-dir"])), Path(str(node["state-dir"])))
    return worker.handle(header, arrays)
