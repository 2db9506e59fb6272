"""Which connected nodes a round still waits for (pure Python, no Flower).

Flower lists a SuperNode as online until it misses heartbeats for 2 x 30 s, and a
killed SuperNode's messages are only answered (with an error) once that happens.
A restarted centre registers as a new node while its dead predecessor is still
listed. Without care, every round in that window would wait for the dead node
until the user's round deadline.

Policy: a node that gave no reply by a round's deadline, or whose reply never arrived
whole (it died while uploading it), becomes a *suspect*. It is
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
        # node id -> the centre its registered key is filed under (server/identity.py), None: no centre's key.
        # None as a whole: names are not pinned (no key registry), a node's first claim sticks instead.
        self.pinned: dict[int, str | None] | None = None

    def pin(self, pins: dict[int, str | None]) -> None:
        """The nodes the SuperLink lists now, each with its centre name from its registered key."""
        self.pinned = {**(self.pinned or {}), **pins}
        self.names.update({n: c for n, c in pins.items() if c is not None})

    def name(self, node_id: int) -> str:
        """The centre's name (pinned, or of the node's first reply), else node-ID."""
        return self.names.get(node_id, f"node-{node_id}")

    def claim(self, node_id: int, centre: str) -> tuple[str, str] | None:
        """(reason code, why) a reply from `node_id` claiming to be `centre` is refused, or None (issue 19,
        threat 5). With pinned names, the claim must be the name the node's registered key is filed under.
        Without, a node keeps the name of its first reply: one that later claims another centre's name (to
        take its place in the round record, or its weight) is lying."""
        if self.pinned is not None:
            pinned = self.pinned.get(node_id)
            if pinned is None:
                return ("unregistered-key", f"node {node_id} replied as {centre[:64]!r}, but its SuperNode key is "
                        "none of the registered centres' (centre-keys); nothing from it is used")
            if pinned != centre:
                return ("name-not-registered", f"node {node_id} replied as {centre[:64]!r}, but its key is the one "
                        f"registered for {pinned!r}; a node cannot claim another centre's name")
            return None
        known = self.names.get(node_id)
        if known is None or known == centre:
            return None
        return ("name-changed", f"node {node_id} replied as {centre[:64]!r} but has been {known!r} in this run; "
                "a node cannot change its centre name")

    def replied(self, node_id: int, centre: str | None = None) -> None:
        if centre and node_id not in self.names and self.pinned is None:  # the first name sticks (see `claim`)
            self.names[node_id] = centre
        self.suspects.discard(node_id)
        self.stale = {m: n for m, n in self.stale.items() if n != node_id}

    def missed(self, node_id: int, message_id: str) -> None:
        self.suspects.add(node_id)
        self.stale[message_id] = node_id

    def lost(self, node_id: int) -> None:
        """The node's reply was announced but never arrived whole (Flower: its objects are unavailable):
        it died while uploading, as a rule. A suspect like a node that gave no reply, but with no message
        left to pull: only a reply to a later round trusts it again."""
        self.suspects.add(node_id)

    def listed(self, node_ids: Iterable[int]) -> None:
        """Forget nodes Flower no longer lists (dead, or left the federation)."""
        keep = set(node_ids)
        self.suspects &= keep
        self.stale = {m: n for m, n in self.stale.items() if n in keep}

    def can_close(self, pending: Iterable[int], replies: int, quorum: int) -> bool:
        """True when only suspects are still pending and `replies` meets the quorum."""
        waiting = list(pending)
        return bool(waiting) and replies >= quorum and all(n in self.suspects for n in waiting)
