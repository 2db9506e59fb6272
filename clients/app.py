"""Flower ClientApp: a thin shell between Flower messages and the centre's worker.

Node identity comes from `--node-config`:
  centre="fr-genci" worker-socket="/path/worker.sock"          (warm worker, default)
  centre="fr-genci" data-dir="/path/data" state-dir="/path/st"  (train in this process)
With a worker, this process never imports torch: it relays numpy arrays.

Before a reply is returned to Flower, the shell describes it (record names, array
names/dtypes/shapes/SHA-256, metric names; no values) and the centre's egress guard
in the worker checks and records it (clients/egress.py): a reply altered after the
worker (an extra record, a string, a non-parameter array) is blocked here too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import egress, wire

app = ClientApp()
DATA_PLANE = "dp-"  # config keys telling the worker where the round's data plane is (url, token, manifest)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return release("train", msg, context, _relay("train", msg, context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return release("evaluate", msg, context, _relay("evaluate", msg, context))


@app.query()
def prepare(msg: Message, context: Context) -> Message:
    """Before round 1 (server/messaging.py `prepare`): the worker builds the run's model and reads
    its data, and this runtime installs the app, so that round 1's clock starts with both warm."""
    return release("prepare", msg, context, _relay("prepare", msg, context))


def release(op: str, msg: Message, context: Context, reply: Message) -> Message:
    """`reply`, once the centre's egress guard has checked and recorded it; raises if it blocks it
    (Flower then sends only an error, whose text names no value)."""
    header = {"op": "egress-check", "reply-to": op, "round": int(msg.content["config"]["server-round"]),
              "run-config": dict(context.run_config), "message": describe_reply(reply.content)}
    _ask(context, header, {})
    return reply


def describe_reply(content: RecordDict) -> egress.Described:
    records: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, record in content.items():
        items = {k: a.numpy() for k, a in record.items()} if isinstance(record, ArrayRecord) else dict(record)
        records[name] = (type(record).__name__, items)
    return egress.describe(records)


def _relay(op: str, msg: Message, context: Context) -> Message:
    node = context.node_config
    centre = str(node.get("centre", f"node-{context.node_id}"))
    # No arrays when the model is to be built from the run's seed (models/packing.py SEED).
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()} if "arrays" in msg.content else {}
    config = msg.content["config"]
    header = {
        "op": op,
        "round": int(config["server-round"]),
        "run-config": dict(context.run_config),
        # How the model travelled and the hashes to check (clients/broadcast.py reads them).
        "broadcast": {k: str(v) for k, v in config.items() if k != "server-round" and not k.startswith(DATA_PLANE)},
    }
    plane = {k.removeprefix(DATA_PLANE): str(v) for k, v in config.items() if k.startswith(DATA_PLANE)}
    if plane:  # the worker pulls the model and pushes its update itself (server/dataplane.py)
        header["data-plane"] = plane
    reply, out = _ask(context, header, arrays)
    reply.setdefault("centre", centre)
    # The worker's reply, record for record (egress.reply_records: the runtime checks the result
    # against the worker's own digest of it before anything is sent).
    content = RecordDict({name: _RECORDS[rtype](items) for name, (rtype, items) in
                          egress.reply_records(reply, out).items()})
    return Message(content=content, reply_to=msg)


_RECORDS: dict[str, Any] = {
    "MetricRecord": MetricRecord,
    "ConfigRecord": ConfigRecord,
    "ArrayRecord": lambda items: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in items.items()}),
}


def _ask(context: Context, header: dict, arrays: wire.Arrays) -> tuple[dict, wire.Arrays]:
    node = context.node_config
    if "worker-ticket" in node:  # the centre's runtime admitted this task (clients/runs.py): name it
        header = {**header, "ticket": str(node["worker-ticket"])}
    if "worker-socket" in node:
        return wire.call(str(node["worker-socket"]), header, arrays)
    return _in_process(str(node.get("centre", f"node-{context.node_id}")), node).handle(header, arrays)


_local_workers: dict[str, Any] = {}  # this process's in-process worker (one message's lifetime)


def _in_process(centre: str, node: Any) -> Any:
    """No worker configured: train here (slower: torch import and set-up every round)."""
    from pathlib import Path

    from clients.worker import CentreWorker

    for key in ("data-dir", "state-dir"):
        if key not in node:
            raise ValueError(f"centre {centre}: --node-config needs worker-socket=... or {key}=...")
    if centre not in _local_workers:
        _local_workers[centre] = CentreWorker(centre, Path(str(node["data-dir"])), Path(str(node["state-dir"])))
    return _local_workers[centre]
