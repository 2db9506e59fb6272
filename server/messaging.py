"""Sending the global model to centres and collecting replies through Flower's Grid.

What each centre is sent (full weights, an int8 delta, or only the seed's hash) is
server/broadcast.py's choice; a centre that answers `stale-base` gets the full
weights within the same round.

Our own push/pull loop instead of `Grid.send_and_receive`: that one sleeps 3 s
between pulls and knows no quorum. Here a round closes as soon as every centre
has replied, or at the user's deadline with whatever replied by then, or, when
only nodes that already missed a round are still pending and the quorum has
replied, right away (server/liveness.py explains why).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from models import blob
from models.packing import FULL, STALE_BASE_METRIC
from server.broadcast import Broadcast
from server.dataplane import Plane
from server.liveness import Liveness
from server.spool import SpooledUpdate
from server.validation import UpdateRejected, read_record

log = logging.getLogger("bridgepool.server")
POLL_SECONDS = 0.1  # each pull is one small HTTP request to the SuperLink; replies wait up to this long
# ...and ~10 ms of CPU on the SuperLink and here, taken from the centres' training on a small
# machine. So the pause grows to BACKOFF_FRACTION of the time since the push or the last reply
# (<= 5 % added to the wait), up to SLOW_POLL_SECONDS: the first round's schedule, and any
# round's once its replies are overdue.
SLOW_POLL_SECONDS = 0.5
BACKOFF_FRACTION = 0.05
# Once a round's replies can be expected (ReplyClock, from the centres' own timings: an expectation
# measured by these same pulls fed its own delay back): one pull per EXPECT_SLOW_POLL_SECONDS
# until a margin before that time, then every FAST_POLL_SECONDS until two margins after it, then
# the back-off above. The margin (5 % of the wait, at least 0.3 s) covers a round's usual spread
# of compute time. Fewer pulls while centres train, and replies seen ~50 ms after they land.
# Slow phase: 0.5 s, not 1 s: the expectation is the last round's, and round 1 (the model built, the
# first steps' pages faulted in) runs seconds longer than round 2, whose replies then waited ~0.5 s on
# average for a pull; two pulls a second cost ~2 % of a core.
EXPECT_SLOW_POLL_SECONDS, FAST_POLL_SECONDS = 0.5, 0.05
EXPECT_MARGIN_FRACTION, EXPECT_MARGIN_SECONDS = 0.05, 0.3
PULL_BACKOFF_SECONDS, PULL_BACKOFF_CAP_SECONDS = 0.02, 1.0
MIN_OBJECT_PULL_SECONDS = 5.0  # a reply announced at the deadline still gets this long to arrive


def _bound_reply_pulls(max_seconds: float | None) -> None:
    """How the Grid pulls a reply's objects, for the pulls that follow.

    A centre's reply is announced before its objects are stored, so the first pull of an object
    often races it and Flower backs off 1 s, doubling to 10 s: ~1 s lost per round. Start that
    back-off at 20 ms instead (the same change the centres' SuperNodes make). And a centre that
    dies while uploading leaves an announced reply whose objects never come: Flower retries until
    the SuperLink's upload session expires (~3 min), inside one pull, past the round's deadline.
    `max_seconds` (the time left to the deadline) bounds that; the reply then counts as an error."""
    from flwr.superlink.grid import http_grid

    stock = getattr(http_grid.pull_objects, "func", http_grid.pull_objects)
    http_grid.pull_objects = functools.partial(stock, initial_backoff=PULL_BACKOFF_SECONDS,
                                               backoff_cap=PULL_BACKOFF_CAP_SECONDS, max_time=max_seconds)


_bound_reply_pulls(None)  # until an exchange knows its deadline


def _pull(grid: Grid, message_ids: list[str], deadline: float) -> list[Message]:
    """The replies among `message_ids` that are in, their objects pulled by `deadline` (monotonic;
    at least MIN_OBJECT_PULL_SECONDS from now)."""
    _bound_reply_pulls(max(MIN_OBJECT_PULL_SECONDS, deadline - time.monotonic()))
    return list(grid.pull_messages(message_ids))


@dataclass
class Reply:
    node_id: int
    centre: str
    # As received, validated and unpacked by the caller: Flower's arrays, or the data plane's upload
    # waiting in the spool (server/spool.py).
    arrays: dict[str, np.ndarray] | SpooledUpdate
    metrics: dict[str, float]
    nbytes: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # set once validated


@dataclass
class Exchange:
    replies: list[Reply] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # node/centre -> reason
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # same keys -> (centre, reason code)
    bytes_sent: int = 0
    resent: dict[str, str] = field(default_factory=dict)  # centre -> form it answered stale-base to
    push_seconds: float = 0.0  # building and handing the round's messages to the SuperLink
    replied_after: dict[str, float] = field(default_factory=dict)  # centre -> seconds from push to its reply here

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


class CentresRefused(RuntimeError):
    """Before round 1, too many centres answered `prepare` with an error to meet the quorum."""


def prepare(grid: Grid, node_ids: list[int], timeout: float, quorum: int = 0) -> dict[str, str]:
    """Before round 1, ask every centre to get ready (clients/app.py `prepare`: its runtime installs
    the app, its worker builds the run's model and reads its data), so round 1 starts warm and a
    centre that cannot start says so now. Returns node/centre -> reason for those that did not
    answer "ready" within `timeout`: a warning only, round 1 deals with them (quorum, deadline).
    A centre that answered with an error cannot train this run as configured (e.g. no GPU for
    device = "cuda"): when fewer than `quorum` centres are left, CentresRefused ends the run
    now, in the centres' own words, instead of in round 1's quorum message."""
    pending = {}
    messages = [Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=nid,
                        message_type="query", group_id="prepare", ttl=timeout + 60.0) for nid in node_ids]
    for mid, nid in zip(grid.push_messages(messages), node_ids, strict=True):
        pending[mid] = nid
    t0 = time.monotonic()
    deadline = t0 + timeout
    problems: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for msg in _pull(grid, list(pending), deadline):
            nid = pending.pop(msg.metadata.reply_to_message_id, None)
            if nid is not None and msg.has_error():
                # Flower wraps the ClientApp's exception as "<class 'T'>:<'text'>": keep the centre's text.
                wrapped = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", msg.error.reason, re.S)
                problems[f"node-{nid}"] = wrapped[1] if wrapped else msg.error.reason
        if pending:
            time.sleep(_poll_wait(time.monotonic() - t0, {}))
    if quorum and len(node_ids) - len(problems) < quorum:
        raise CentresRefused(f"before round 1, {len(problems)} of {len(node_ids)} centres could not start this run "
                             f"(quorum {quorum}): " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
    problems.update({f"node-{nid}": f"not ready within {timeout:.0f}s" for nid in pending.values()})
    return problems


def exchange(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    broadcast: Broadcast,
    server_round: int,
    timeout: float,
    liveness: Liveness | None = None,
    quorum: int = 0,
    expected: float = 0.0,
    plane: Plane | None = None,
    ahead: bool = False,
) -> Exchange:
    """Send the current broadcast model (`broadcast.advance` was called) to every node and
    gather replies until all answer or the deadline.

    Each node gets the form `broadcast.payload` picks (full, int8 delta or seed); a node
    that answers `stale-base` is sent the full weights at once, within the same deadline.
    With `liveness`, suspects (nodes that missed a round) are not waited for once
    `quorum` replies are in, and late replies to earlier rounds clear suspicion. `expected`
    (ReplyClock): seconds after which replies are due, to pull sparsely before then.
    `ahead` (data plane, train): each centre is also granted a read of the next round's full
    model (`DataPlaneServer.grant_ahead`), to pull it the moment it is published.
    """
    live = liveness or Liveness()
    live.listed(node_ids)
    result = Exchange()
    records: dict[str, ArrayRecord] = {}  # one per form, shared by every message of that form
    published: dict[str, tuple[str, int]] = {}  # data plane: form -> (manifest JSON, bytes)
    pending: dict[str, tuple[int, str]] = {}  # message id -> (node, form sent)
    tokens: dict[int, str] = {}  # data plane: node -> its token for this round
    if plane is not None:
        plane.server.end_exchange()  # the previous exchange's blobs and unclaimed updates go

    def push(nodes: list[int], full: bool = False) -> None:
        messages, forms = [], []
        for nid in nodes:
            p = broadcast.payload(nid, full)
            config = {"server-round": server_round, **p.config}
            content = RecordDict({"config": ConfigRecord(config)})
            if plane is not None:
                config.update(_on_plane(plane, p.form, p.arrays, published, nid, message_type, server_round,
                                        timeout, tokens))
                if ahead and message_type == "train":  # the blob id the next round publishes its full model as
                    config["dp-next"] = plane.server.grant_ahead(nid, server_round + 1,
                                                                 f"train/{server_round + 1}/{FULL}", 2 * timeout + 60.0)
                content["config"] = ConfigRecord(config)
                result.bytes_sent += published[p.form][1] if p.form in published else 0
            else:
                if p.form not in records:
                    records[p.form] = ArrayRecord({k: Array(v) for k, v in p.arrays.items()})
                result.bytes_sent += int(records[p.form].count_bytes())
                if p.arrays:
                    content["arrays"] = records[p.form]
            messages.append(Message(content=content, dst_node_id=nid, message_type=message_type,
                                    group_id=str(server_round), ttl=timeout + 60.0))
            forms.append(p.form)
        for mid, nid, form in zip(grid.push_messages(messages), nodes, forms, strict=True):
            pending[mid] = (nid, form)

    t_push = time.monotonic()
    push(node_ids)
    result.push_seconds = time.monotonic() - t_push
    deadline = t_push + timeout
    while pending and time.monotonic() < deadline:
        for msg in _pull(grid, list(pending) + list(live.stale), deadline):
            mid = msg.metadata.reply_to_message_id
            if mid in live.stale:  # an earlier round's reply: the node is alive after all
                late = live.stale.pop(mid)
                if not msg.has_error():
                    log.info("%s answered an earlier round late; waiting for it again", live.name(late))
                    live.replied(late)
                continue
            nid, form = pending.pop(mid, (None, ""))
            if nid is None:
                continue
            if _stale_base(msg) and form != FULL:
                live.replied(nid, _centre(msg, nid))
                broadcast.forget(nid)
                result.resent[live.name(nid)] = form
                log.warning("%s could not rebuild the %s model of round %d (stale-base: its copy differs, "
                            "e.g. a restarted worker or another torch version); sending it the full weights",
                            live.name(nid), form, server_round)
                push([nid], full=True)
                continue
            _collect(msg, nid, result, live, broadcast, plane, tokens.get(nid, ""))
            result.replied_after[live.name(nid)] = time.monotonic() - t_push
        if live.can_close((n for n, _ in pending.values()), len(result.replies), quorum):
            log.info("closing round %d without %s: it missed a previous round and the quorum of %d "
                     "has replied", server_round, ", ".join(live.name(n) for n, _ in pending.values()), quorum)
            break
        if pending:
            time.sleep(_poll_wait(time.monotonic() - t_push, result.replied_after, expected))
    for mid, (nid, _) in pending.items():
        was_suspect = nid in live.suspects
        live.missed(nid, mid)
        broadcast.forget(nid)
        why = ("no reply; not waited for, it also missed an earlier round" if was_suspect
               else f"no reply within the {timeout:.0f}s round deadline")
        result.fail(_key(live, nid), live.name(nid), "no-reply", why)
    return result


def _on_plane(plane: Plane, form: str, arrays: dict[str, np.ndarray], published: dict[str, tuple[str, int]],
              nid: int, message_type: str, server_round: int, timeout: float, tokens: dict[int, str]) -> dict[str, str]:
    """The config keys that send `nid` this round's model by the data plane (clients/app.py DATA_PLANE):
    the blob of `form`, published once per form, and a token to read it and (train) to upload."""
    blob_id = f"{message_type}/{server_round}/{form}" if arrays else None
    if blob_id is not None and form not in published:
        entries = plane.server.publish(blob_id, arrays)
        published[form] = (blob.to_json(entries), blob.total_bytes(entries))
    token = plane.server.grant(nid, server_round, blob_id, plane.upload if message_type == "train" else None,
                               ttl=timeout + 60.0)
    tokens[nid] = token
    return {"dp-url": plane.url, "dp-token": token, **({"dp-manifest": published[form][0]} if blob_id else {})}


def _poll_wait(elapsed: float, replied_after: dict[str, float], expected: float = 0.0) -> float:
    """Seconds until the next pull, `elapsed` after the push, the replies being expected after
    `expected` seconds (0: unknown; see BACKOFF_FRACTION and EXPECT_MARGIN_FRACTION)."""
    margin = max(EXPECT_MARGIN_SECONDS, EXPECT_MARGIN_FRACTION * expected)
    since_event = elapsed - max(replied_after.values(), default=0.0)
    backoff = min(SLOW_POLL_SECONDS, max(POLL_SECONDS, BACKOFF_FRACTION * since_event))
    if expected > 0 and elapsed < expected + 2 * margin:
        until_fast = expected - margin - elapsed
        if until_fast <= FAST_POLL_SECONDS:
            return FAST_POLL_SECONDS
        # Early replies: the expectation was the last round's, and this one runs faster (measured: one
        # centre seen 1 s before the other, which had replied 70 ms after it). The rest follow soon.
        wait = min(EXPECT_SLOW_POLL_SECONDS, until_fast)
        return min(wait, backoff) if replied_after else wait
    return backoff


@dataclass
class ReplyClock:
    """When the next round's train replies are due, for `exchange`'s pulls. From the centres' own
    timings, not from when the pulls saw the replies (that would feed the polling delay back into
    the estimate, each round later than the last): the slowest centre's work after it received the
    model, plus the shortest delivery seen so far (push to reply seen, less that centre's work:
    transfers both ways and one pull's delay; a minimum, so a late-seen reply never raises it)."""

    inner_steps: int
    work: float = 0.0
    delivery: float = float("inf")

    def observe(self, ex: Exchange) -> None:
        works = []
        for r in ex.replies:
            m = r.metrics  # steps-ahead ran before the model came (overlap-steps): not in this wait
            ahead = min(1.0, m.get("steps-ahead", 0.0) / max(1, self.inner_steps))
            work = m.get("eval-seconds", 0.0) + m.get("compute-seconds", 0.0) * (1.0 - ahead)
            works.append(work)
            if r.centre in ex.replied_after and r.centre not in ex.resent:
                self.delivery = min(self.delivery, max(0.0, ex.replied_after[r.centre] - work))
        self.work = max(works, default=0.0)

    def expected(self) -> float:
        """Seconds from push to the replies, 0 while unknown (the first round)."""
        return self.work + self.delivery if self.work > 0 and self.delivery != float("inf") else 0.0


def _key(live: Liveness, nid: int) -> str:
    """A silent node's key in `failures`: its centre and node id (a restarted centre has a new one)."""
    return f"{live.names[nid]} (node {nid})" if nid in live.names else f"node-{nid}"


def _stale_base(msg: Message) -> bool:
    return not msg.has_error() and "metrics" in msg.content and STALE_BASE_METRIC in msg.content["metrics"]


def _centre(msg: Message, nid: int) -> str:
    # .get and [:64]: a reply's claimed name is untrusted (a missing key, a megabyte of text)
    return str(msg.content["centre"].get("name", f"node-{nid}"))[:64] if "centre" in msg.content else f"node-{nid}"


def _collect(msg: Message, nid: int, result: Exchange, live: Liveness, broadcast: Broadcast,
             plane: Plane | None = None, token: str = "") -> None:
    if msg.has_error():
        broadcast.forget(nid)
        code = "node-unavailable" if msg.error.code == ErrorCode.NODE_UNAVAILABLE else "centre-error"
        if msg.error.code == ErrorCode.MESSAGE_UNAVAILABLE:  # announced, never uploaded whole: not waited for again
            live.lost(nid)
        result.fail(_key(live, nid), live.name(nid), code, f"centre error: {msg.error.reason}")
        return
    content = msg.content
    centre = _centre(msg, nid)
    refused = live.claim(nid, centre)
    if refused:  # named in the round's failures; its update never reaches validation
        broadcast.forget(nid)
        result.fail(_key(live, nid), live.name(nid), *refused)
        return
    live.replied(nid, centre)
    if _stale_base(msg):  # to the full weights: nothing more to send it (the worker never does this)
        broadcast.forget(nid)
        result.fail(_key(live, nid), centre, "stale-base", "answered stale-base to the full weights")
        return
    broadcast.delivered(nid)
    try:  # a MetricRecord may hold lists: not a number here, and not a reason to end the run
        metrics = {k: float(v) for k, v in content["metrics"].items()} if "metrics" in content else {}
    except (TypeError, ValueError):
        result.fail(centre, centre, "metrics", "rejected (metrics): a metric is not a single number")
        return
    arrays, nbytes = {}, 0
    if plane is not None and "arrays" in content:  # only the centre's worker sends model bytes, on the data plane
        result.fail(_key(live, nid), centre, "upload", "update refused: arrays inside the Flower reply, not on "
                    "the data plane (a ClientApp that went around the centre's worker?)")
        return
    if plane is not None and "upload" in content:  # the update came on the data plane: take it if it is the one named
        try:
            entries = blob.from_json(str(content["upload"]["manifest"]))
            arrays = plane.server.take(token, {e.name: e.digest for e in entries})
            nbytes = blob.total_bytes(entries)
        except (blob.BlobError, KeyError) as err:
            result.fail(_key(live, nid), centre, "upload", f"update refused: {err}")
            return
    elif "arrays" in content:
        record = content["arrays"]
        nbytes = int(record.count_bytes())
        try:  # names, dtypes, shapes and bytes checked before any array is converted
            arrays = read_record(record, broadcast.base.size)
        except UpdateRejected as err:
            result.fail(centre, centre, err.reason, f"rejected ({err.reason}): {err}")  # keyed as _accept's
            return
    result.replies.append(Reply(nid, centre, arrays, metrics, nbytes))
