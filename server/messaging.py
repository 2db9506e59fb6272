"""Sending the global model to centres and collecting replies through Flower's Grid.

Our own push/pull loop instead of `Grid.send_and_receive`: that one sleeps 3 s
between pulls and knows no quorum. Here a round closes as soon as every centre
has replied, or at the user's deadline with whatever replied by then, or, when
only nodes that already missed a round are still pending and the quorum has
replied, right away (server/liveness.py explains why).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from models.packing import PARAMS_KEY, pack
from server.liveness import Liveness

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
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # same keys -> (centre, reason code)
    bytes_sent: int = 0

    def fail(self, key: str, centre: str, code: str, message: str) -> None:
        self.failures[key] = message
        self.codes[key] = (centre, code)


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
    liveness: Liveness | None = None,
    quorum: int = 0,
) -> Exchange:
    """Send `state` to every node and gather replies until all answer or the deadline.

    With `liveness`, suspects (nodes that missed a round) are not waited for once
    `quorum` replies are in, and late replies to earlier rounds clear suspicion.
    """
    live = liveness or Liveness()
    live.listed(node_ids)
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
        for msg in grid.pull_messages(list(pending) + list(live.stale)):
            mid = msg.metadata.reply_to_message_id
            if mid in live.stale:  # an earlier round's reply: the node is alive after all
                late = live.stale.pop(mid)
                if not msg.has_error():
                    log.info("%s answered an earlier round late; waiting for it again", live.name(late))
                    live.replied(late)
                continue
            nid = pending.pop(mid, None)
            if nid is None:
                continue
            _collect(msg, nid, result, live)
        if live.can_close(pending.values(), len(result.replies), quorum):
            log.info("closing round %d without %s: it missed a previous round and the quorum of %d "
                     "has replied", server_round, ", ".join(live.name(n) for n in pending.values()), quorum)
            break
        if pending:
            time.sleep(POLL_SECONDS)
    for mid, nid in pending.items():
        was_suspect = nid in live.suspects
        live.missed(nid, mid)
        why = ("no reply; not waited for, it also missed an earlier round" if was_suspect
               else f"no reply within the {timeout:.0f}s round deadline")
        result.fail(_key(live, nid), live.name(nid), "no-reply", why)
    return result


def _key(live: Liveness, nid: int) -> str:
    """A silent node's key in `failures`: its centre and node id (a restarted centre has a new one)."""
    return f"{live.names[nid]} (node {nid})" if nid in live.names else f"node-{nid}"


def _collect(msg: Message, nid: int, result: Exchange, live: Liveness) -> None:
    if msg.has_error():
        code = "node-unavailable" if msg.error.code == ErrorCode.NODE_UNAVAILABLE else "centre-error"
        result.fail(_key(live, nid), live.name(nid), code, f"centre error: {msg.error.reason}")
        return
    content = msg.content
    centre = str(content["centre"]["name"]) if "centre" in content else f"node-{nid}"
    live.replied(nid, centre)
    metrics = {k: float(v) for k, v in content["metrics"].items()} if "metrics" in content else {}
    arrays, nbytes = {}, 0
    if "arrays" in content:
        record = content["arrays"]
        nbytes = int(record.count_bytes())
        arrays = {k: a.numpy() for k, a in record.items()}
    result.replies.append(Reply(nid, centre, arrays, metrics, nbytes))
