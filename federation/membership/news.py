"""News items and their dissemination queue (pure: no threads, no sockets).

A news item says one thing about one subject: a member is alive / suspect / dead / left at an
incarnation, a node's catalog reached an epoch, or a generic typed item (e.g. which pieces a
node holds). Items about the same subject supersede each other (a newer incarnation, a higher
epoch, a higher version), so the queue holds at most one item per subject. Every item is
piggybacked on outgoing messages until it has been sent `retransmit_mult * ceil(log10(N + 1))`
times, N being the number of members: a change reaches everyone in O(log N) rounds while each
node sends a bounded number of items per message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from loraflight.errors import PeerError

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
EPOCH = "epoch"  # a node's catalog epoch: a card was added or withdrawn there
ITEM = "item"  # a generic typed item: topic, key, version, small JSON value
MEMBER_KINDS = (ALIVE, SUSPECT, DEAD, LEFT)
KINDS = (*MEMBER_KINDS, EPOCH, ITEM)

MAX_ID = 128  # node ids, topics and keys
MAX_URI = 256
MAX_VALUE_BYTES = 1024  # a generic item's JSON value, encoded
MAX_INT = 2**62


@dataclass(frozen=True)
class News:
    """One news item. `number` is the incarnation (member kinds), the epoch or the version."""

    kind: str
    node: str  # the member the item is about (ITEM: the node that published it)
    number: int
    uri: str = ""  # ALIVE: the member's address
    topic: str = ""  # ITEM only
    key: str = ""  # ITEM only
    value: Any = field(default=None, compare=False)  # ITEM only: small JSON value
    # SUSPECT only: how long the sender has held the suspicion, ms (filled in when sent), so
    # every member's suspicion runs out at about the same time as the first suspector's
    age_ms: int = field(default=0, compare=False)

    @property
    def subject(self) -> tuple[str, ...]:
        """Items with the same subject supersede each other."""
        if self.kind in MEMBER_KINDS:
            return ("member", self.node)
        if self.kind == EPOCH:
            return (EPOCH, self.node)
        return (ITEM, self.topic, self.key)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.kind, "n": self.node, "i": self.number}
        if self.uri:
            out["u"] = self.uri
        if self.kind == ITEM:
            out.update(t=self.topic, key=self.key, v=self.value)
        if self.kind == SUSPECT and self.age_ms > 0:
            out["a"] = self.age_ms
        return out


def _text(d: dict[str, Any], name: str, limit: int, what: str, required: bool = True) -> str:
    v = d.get(name, "")
    if not isinstance(v, str) or len(v) > limit or (required and not v):
        raise PeerError(f"{what}: field {name!r} must be a string of 1..{limit} characters")
    return v


def news_from_wire(d: Any, what: str = "news item") -> News:
    """Parse one item; PeerError saying which field is wrong (the sender's bug, not ours)."""
    if not isinstance(d, dict):
        raise PeerError(f"{what} must be a JSON object")
    kind = d.get("k")
    if kind not in KINDS:
        raise PeerError(f"{what}: kind {kind!r} is not one of {', '.join(KINDS)}")
    num = d.get("i")
    if not isinstance(num, int) or isinstance(num, bool) or not 0 <= num < MAX_INT:
        raise PeerError(f"{what}: 'i' must be an integer in 0..2^62")
    node = _text(d, "n", MAX_ID, what)
    uri = _text(d, "u", MAX_URI, what, required=kind == ALIVE)
    if kind == SUSPECT:
        age = d.get("a", 0)
        if not isinstance(age, int) or isinstance(age, bool) or not 0 <= age < MAX_INT:
            raise PeerError(f"{what}: 'a' (suspected for, ms) must be an integer in 0..2^62")
        return News(kind, node, num, uri, age_ms=age)
    if kind != ITEM:
        return News(kind, node, num, uri)
    value = d.get("v")
    if len(json.dumps(value)) > MAX_VALUE_BYTES:
        raise PeerError(f"{what}: value is over {MAX_VALUE_BYTES} bytes of JSON")
    return News(kind, node, num, uri, _text(d, "t", MAX_ID, what), _text(d, "key", MAX_ID, what), value)


def newer(a: News, b: News) -> bool:
    """Does `a` supersede `b` (same subject)? Member kinds: higher incarnation, or at the same
    incarnation a stronger claim (suspect over alive, dead/left over both)."""
    if a.number != b.number:
        return a.number > b.number
    if a.kind in MEMBER_KINDS and b.kind in MEMBER_KINDS:
        rank = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 2}
        return rank[a.kind] > rank[b.kind]
    return False


def retransmit_limit(mult: int, members: int) -> int:
    """How many times an item is sent: mult * ceil(log10(N + 1)), at least 1."""
    return max(1, mult * math.ceil(math.log10(max(1, members) + 1)))


class NewsQueue:
    """Items waiting to be piggybacked, least-sent first; one per subject."""

    def __init__(self, retransmit_mult: int = 4) -> None:
        self.retransmit_mult = retransmit_mult
        self._items: dict[tuple[str, ...], list[Any]] = {}  # subject -> [News, times sent, seq]
        self._seq = 0

    def add(self, item: News) -> None:
        """Queue `item`, replacing an older item about the same subject (sent count reset)."""
        self._seq += 1
        self._items[item.subject] = [item, 0, self._seq]

    def take(self, members: int, limit: int) -> list[News]:
        """Up to `limit` items for one message; each counts as sent once, and an item sent
        `retransmit_limit` times leaves the queue."""
        if not self._items:
            return []
        cap = retransmit_limit(self.retransmit_mult, members)
        chosen = sorted(self._items.items(), key=lambda kv: (kv[1][1], -kv[1][2]))[:limit]
        out = []
        for subject, slot in chosen:
            out.append(slot[0])
            slot[1] += 1
            if slot[1] >= cap:
                del self._items[subject]
        return out

    def __len__(self) -> int:
        return len(self._items)

    def pending(self) -> list[News]:
        return [slot[0] for slot in self._items.values()]


__all__ = [
    "ALIVE",
    "DEAD",
    "EPOCH",
    "ITEM",
    "KINDS",
    "LEFT",
    "MAX_ID",
    "MAX_INT",
    "MAX_URI",
    "MAX_VALUE_BYTES",
    "MEMBER_KINDS",
    "SUSPECT",
    "News",
    "NewsQueue",
    "newer",
    "news_from_wire",
    "retransmit_limit",
]
