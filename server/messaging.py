"""Sending the global model to centres and collecting replies through Flower's Grid.

Our own push/pull loop instead of `Grid.send_and_receive`: that one sleeps 3 s
between pulls and knows no quorum. Here a round closes as soon as every centre
has replied, or at the user's deadline with whatever replied by then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from models.packing import PARAMS_KEY, pack

log = logging.getLogger("bridgepool.server")
POLL_SECONDS = 0.5  # each pull is an HTTP request the SuperLink must serve


@dataclass
class Reply:
    node_id: int
    centre: str
    arrays: dict[str, np.ndarray]  # as received: validated and unpacked by the caller
    metrics: dict[str, float]
    nbytes: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # set once validated


@dataclass
class Exchange:
    replies: list[Reply] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # node/centre -> reason
    bytes_sent: int = 0


def wait_for_centres(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {expected} centres connected within {timeout:.0f}s; "
                "check each centre's SuperNode log (the SuperLink address, TLS and keys) "
                "or lower expected-centres"
            )
        time.sleep(0.5)


def exchange(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    state: dict[str, torch.Tensor],
    server_round: int,
    timeout: float,
) -> Exchange:
    """Send `state` to every node and gather replies until all answer or the deadline."""
    arrays = ArrayRecord({PARAMS_KEY: Array(pack(state))})
    payload = int(arrays.count_bytes())
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
            dst_node_id=nid,
            message_type=message_type,
            group_id=str(server_round),
            ttl=timeout + 60.0,
        )
        for nid in node_ids
    ]
    pending = {mid: nid for mid, nid in zip(grid.push_messages(messages), node_ids, strict=True)}
    result = Exchange(bytes_sent=payload * len(node_ids))
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for msg in grid.pull_messages(list(pending)):
            nid = pending.pop(msg.metadata.reply_to_message_id, None)
            if nid is None:
                continue
            _collect(msg, nid, result)
        if pending:
            time.sleep(POLL_SECONDS)
    for nid in pending.values():
        result.failures[f"node-{nid}"] = f"no reply within the {timeout:.0f}s round deadline"
    return result


def _collect(msg: Message, nid: int, result: Exchange) -> None:
    if msg.has_error():
        result.failures[f"node-{nid}"] = f"centre error: {msg.error.reason}"
        return
    content = msg.content
    centre = str(content["centre"]["name"]) if "centre" in content else f"node-{nid}"
    metrics = {k: float(v) for k, v in content["metrics"].items()} if "metrics" in content else {}
    arrays, nbytes = {}, 0
    if "arrays" in content:
        record = content["arrays"]
        nbytes = int(record.count_bytes())
        arrays = {k: a.numpy() for k, a in record.items()}
    result.replies.append(Reply(nid, centre, arrays, metrics, nbytes))
