"""A dead node that Flower still lists holds up one round at most (server/liveness.py),
checked with the real `exchange` loop against a scripted in-memory grid."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from server import messaging
from server.broadcast import Broadcast
from server.liveness import Liveness
from server.messaging import exchange

LOST = "Reply message objects are unavailable."  # as flwr/superlink/grid/http_grid.py begins its reason
STATE = Broadcast(np.zeros(3, np.float32), "none")
STATE.advance(np.ones(3, np.float32))


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """What Flower sets inside a ServerApp process, so Messages can be built here; fast polls."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    monkeypatch.setattr(messaging, "POLL_SECONDS", 0.01)


class ScriptedGrid:
    """Answers a message once `ready(node, round, pulls)` is true (pulls counted from 1 per round);
    a node in `broken` answers with the error Flower's Grid makes of a reply whose objects never came."""

    def __init__(self, ready: Callable[[int, int, int], bool], broken: frozenset[int] = frozenset()):
        self.ready, self.sent, self.pulls, self.pushed, self.broken = ready, {}, 0, 0, broken

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pulls, ids = 0, []
        for msg in messages:
            mid, self.pushed = f"m{self.pushed}", self.pushed + 1
            msg.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.pulls += 1
        out = []
        for mid in ids:
            msg = self.sent[mid]
            if self.ready(msg.metadata.dst_node_id, int(msg.metadata.group_id), self.pulls):
                del self.sent[mid]
                if msg.metadata.dst_node_id in self.broken:
                    out.append(Message(error=Error(ErrorCode.MESSAGE_UNAVAILABLE, LOST), reply_to=msg))
                    continue
                content = RecordDict({"metrics": MetricRecord({"tokens": 1.0}),
                                      "centre": ConfigRecord({"name": f"c{msg.metadata.dst_node_id}"})})
                out.append(Message(content=content, reply_to=msg))
        return out


def test_a_node_that_missed_a_round_is_not_waited_for_again():
    live, grid = Liveness(), ScriptedGrid(lambda node, rnd, pulls: node != 4)
    first = exchange(grid, [1, 2, 3, 4], "train", STATE, 1, timeout=0.3, liveness=live, quorum=3)
    assert sorted(r.node_id for r in first.replies) == [1, 2, 3]
    assert first.codes == {"node-4": ("node-4", "no-reply")} and "0s round deadline" in first.failures["node-4"]
    assert live.suspects == {4}

    second = exchange(grid, [1, 2, 3, 4], "train", STATE, 2, timeout=60.0, liveness=live, quorum=3)
    assert grid.pulls == 1  # closed as soon as the quorum replied: no wait for node 4
    assert "not waited for" in second.failures["node-4"]

    live.listed([1, 2, 3])  # Flower stopped listing it: forgotten
    assert live.suspects == set() and live.stale == {}


def test_a_node_whose_reply_never_arrived_whole_is_not_waited_for_again():
    """A centre killed while uploading its reply: Flower's Grid gives up pulling the reply's objects and
    hands the server an error. That node is as dead as one that gave no reply: the next round closes on
    the quorum without waiting for it, and a reply from it trusts it again."""
    live, grid = Liveness(), ScriptedGrid(lambda node, rnd, pulls: True, broken=frozenset({4}))
    first = exchange(grid, [1, 2, 3, 4], "train", STATE, 1, timeout=60.0, liveness=live, quorum=3)
    assert first.codes["node-4"] == ("node-4", "centre-error") and LOST in first.failures["node-4"]
    assert live.suspects == {4}

    grid.ready = lambda node, rnd, pulls: node != 4
    second = exchange(grid, [1, 2, 3, 4], "train", STATE, 2, timeout=60.0, liveness=live, quorum=3)
    assert grid.pulls == 1 and "not waited for" in second.failures["node-4"]

    grid.ready, grid.broken = (lambda node, rnd, pulls: True), frozenset()
    exchange(grid, [1, 2, 3, 4], "train", STATE, 3, timeout=60.0, liveness=live, quorum=3)
    assert live.suspects == set()


def test_a_suspect_that_answers_late_is_trusted_again():
    # Node 3 is slow, not dead: it misses round 1, answers it during round 2 (pull 2) before
    # the others finish round 2 (pull 3), and answers round 2 itself at pull 5.
    now = {"round": 1}

    def ready(node: int, rnd: int, pulls: int) -> bool:
        if node != 3:
            return pulls >= (1 if rnd == 1 else 3)
        return now["round"] == 2 and pulls >= (2 if rnd == 1 else 5)

    live, grid = Liveness(), ScriptedGrid(ready)
    exchange(grid, [1, 2, 3], "train", STATE, 1, timeout=0.2, liveness=live, quorum=2)
    assert live.suspects == {3}
    now["round"] = 2
    second = exchange(grid, [1, 2, 3], "train", STATE, 2, timeout=60.0, liveness=live, quorum=2)
    assert sorted(r.node_id for r in second.replies) == [1, 2, 3]  # its late reply lifted the suspicion
    assert live.suspects == set() and live.names[3] == "c3"


def test_quorum_not_met_waits_for_suspects_until_the_deadline():
    live, grid = Liveness(), ScriptedGrid(lambda node, rnd, pulls: node == 1)
    live.suspects = {2, 3}
    ex = exchange(grid, [1, 2, 3], "train", STATE, 1, timeout=0.2, liveness=live, quorum=2)
    assert [r.node_id for r in ex.replies] == [1] and grid.pulls > 3  # kept pulling to the deadline
    assert set(ex.failures) == {"node-2", "node-3"}


def test_server_reply_polls_back_off_with_the_wait():
    """Each pull costs the SuperLink and the ServerApp CPU: fast right after a push or a
    reply, then at most 5 % of the time waited, up to SLOW_POLL_SECONDS."""
    wait = messaging._poll_wait
    assert wait(0.0, {}) == messaging.POLL_SECONDS
    assert wait(4.0, {}) == pytest.approx(0.2)
    assert wait(60.0, {}) == messaging.SLOW_POLL_SECONDS
    assert wait(30.0, {"fr": 29.9}) == messaging.POLL_SECONDS  # one replied: the rest follow soon


def test_server_pulls_sparsely_until_the_replies_are_due():
    """With the replies due after `expected` s: one pull a second, then every 50 ms from a margin
    before that time (5 %, at least 0.3 s) to two margins after it, then the back-off again."""
    wait = messaging._poll_wait
    assert wait(0.0, {}, 10.0) == messaging.EXPECT_SLOW_POLL_SECONDS
    assert wait(9.3, {}, 10.0) == pytest.approx(0.2)  # lands on the fast phase's start, 9.5 s
    assert wait(9.5, {}, 10.0) == wait(10.9, {"fr": 10.5}, 10.0) == messaging.FAST_POLL_SECONDS
    assert wait(2.0, {}, 2.0) == messaging.FAST_POLL_SECONDS  # short rounds: 0.3 s margin
    assert wait(3.4, {"fr": 3.3}, 10.0) == messaging.POLL_SECONDS  # early: the rest follow soon, not 1 s later
    assert wait(8.0, {"fr": 3.0}, 10.0) == pytest.approx(0.25)  # ...backing off from that reply
    assert wait(60.0, {}, 10.0) == wait(11.1, {}, 10.0) == messaging.SLOW_POLL_SECONDS  # late: the back-off


def _round(seen: dict[str, float], work: dict[str, tuple[float, float, float]]) -> messaging.Exchange:
    ex = messaging.Exchange(replied_after=dict(seen))
    for i, (centre, (compute, evaluate, ahead)) in enumerate(work.items()):
        metrics = {"compute-seconds": compute, "eval-seconds": evaluate, "steps-ahead": ahead}
        ex.replies.append(messaging.Reply(i + 1, centre, {}, metrics, 0))
    return ex


def test_reply_clock_learns_from_the_centres_timings_not_from_its_own_pulls():
    clock = messaging.ReplyClock(inner_steps=80)
    assert clock.expected() == 0.0  # round 1: unknown, the plain back-off
    clock.observe(_round({"fr": 7.9, "de": 8.3}, {"fr": (7.0, 0.2, 0), "de": (7.2, 0.2, 0)}))
    assert clock.expected() == pytest.approx(7.4 + 0.7)  # slowest work + fastest delivery
    # Seen a second late (a slow pull): the work is the same, so the estimate does not move.
    clock.observe(_round({"fr": 9.2, "de": 9.4}, {"fr": (7.0, 0.2, 0), "de": (7.2, 0.2, 0)}))
    assert clock.expected() == pytest.approx(7.4 + 0.7)
    # 16 of 80 steps trained ahead, before the model came: only the rest is waited for.
    clock.observe(_round({"fr": 7.0}, {"fr": (8.0, 0.2, 16)}))
    assert clock.expected() == pytest.approx(0.2 + 6.4 + 0.4)


def test_a_reply_whose_objects_never_come_gives_up_by_the_deadline():
    """A centre that dies while uploading its reply leaves it announced with objects that never
    arrive; the Grid's pull of them must end with the round's time left, not Flower's ~3 min."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
    from flwr.superlink.grid import http_grid

    def never(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    try:
        messaging._bound_reply_pulls(0.5)
        t0 = time.monotonic()
        with pytest.raises(ObjectPullError):
            http_grid.pull_objects(["a-reply-object"], never)
        assert time.monotonic() - t0 < 5.0
        assert http_grid.pull_objects.keywords["initial_backoff"] == messaging.PULL_BACKOFF_SECONDS
    finally:
        messaging._bound_reply_pulls(None)
