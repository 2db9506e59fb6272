"""Which connected nodes a round still waits for (pure Python, no Flower).

Flower lists a SuperNode as online until it misses heartbeats for 2 x 30 s, and a
killed SuperNode's messages are only answered (with an error) once that happens.
A restarted centre registers as a new node while its dead predecessor is still
listed. Without care, every round in that window would wait for the dead node
until the user's round deadline.

Policy: a node that gave no reply by a round's deadline becomes a *suspect*. It is
still sent every round (a slow centre must be able to come back), but once all
non-suspects have replied and the quorum is met, the round closes without waiting
for suspects. A suspect is trusted again as soon as any reply from it arrives,
including a late reply to an earlier round (those message ids keep being pulled;
the late content itself is discarded, it was trained from an older model). A node
Flower no longer lists is forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable


class Liveness:
    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # node id -> centre name, learnt from its replies
        self.suspects: set[int] = set()
        self.stale: dict[str, int] = {}  # unanswered message id -> node, pulled for late replies

    def name(self, node_id: int) -> str:
        """The centre's name if the node ever replied, else node-ID."""
        return self.names.get(node_id, f"node-{node_id}")

    def renamed(self, node_id: int, centre: str) -> str | None:
        """Why a reply from `node_id` claiming to be `centre` is refused, or None. A node keeps the
        name of its first reply: one that later claims another centre's name (to take its place
        in the round record, or its weight) is lying (issue 19, threat 5)."""
        known = self.names.get(node_id)
        if known is None or known == centre:
            return None
        return (f"node {node_id} replied as {centre[:64]!r} but has been {known!r} in this run; "
                "a node cannot change its centre name")

    def replied(self, node_id: int, centre: str | None = None) -> None:
        if centre and node_id not in self.names:  # the first name sticks (see `renamed`)
            self.names[node_id] = centre
        self.suspects.discard(node_id)
        self.stale = {m: n for m, n in self.stale.items() if n != node_id}

    def missed(self, node_id: int, message_id: str) -> None:
        self.suspects.add(node_id)
        self.stale[message_id] = node_id

    def listed(self, node_ids: Iterable[int]) -> None:
        """Forget nodes Flower no longer lists (dead, or left the federation)."""
        keep = set(node_ids)
        self.suspects &= keep
        self.stale = {m: n for m, n in self.stale.items() if n in keep}

    def can_close(self, pending: Iterable[int], replies: int, quorum: int) -> bool:
        """True when only suspects are still pending and `replies` meets the quorum."""
        waiting = list(pending)
        return bool(waiting) and replies >= quorum and all(n in self.suspects for n in waiting)
