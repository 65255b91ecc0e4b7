"""The membership actions' bodies: names, bounds, parsing (pure).

Every body is one JSON object of at most `protocol.MAX_ACTION_BODY` bytes (64 KiB). A ping,
its ack, a ping-req and a sync all carry the sender's header and piggybacked news:

    {"from": node id, "fleet": fleet id, "inc": incarnation, "uri": its address, "epoch": catalog epoch,
     "news": [{"k": kind, "n": node, "i": number, "u": uri, "t": topic, "key": key, "v": value}]}

plus `"target"` (ping-req: the node id to probe), `"ack"` (ping-req answer: whether the target
answered) `"members"` (sync: `[[node id, uri, incarnation, state, epoch], ...]`) and `"known"` (sync: a
sample of the generic items, as news items).
Anything outside these bounds is refused with a `PeerError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraflight.errors import PeerError

from ..protocol import parse_json_body
from .news import ALIVE, MAX_ID, MAX_INT, MAX_URI, MEMBER_KINDS, News, news_from_wire

ACTION_PING = "swim-ping"
ACTION_PING_REQ = "swim-ping-req"
ACTION_SYNC = "swim-sync"
ACTIONS: dict[str, str] = {
    ACTION_PING: "membership probe; body and answer: sender header + piggybacked news (JSON)",
    ACTION_PING_REQ: 'probe {"target": node id} for the sender; answer {"ack": bool} + header + news',
    ACTION_SYNC: "anti-entropy: exchange member lists and catalog epochs (JSON)",
}
MAX_NEWS = 64  # items in one message
MAX_MEMBERS = 256  # member entries in one sync body
MAX_KNOWN = 32  # generic items in one sync body


@dataclass(frozen=True)
class Message:
    sender: str
    incarnation: int
    uri: str
    epoch: int
    fleet: str = ""
    news: list[News] = field(default_factory=list)
    known: list[News] = field(default_factory=list)  # sync: a sample of the generic items known
    members: list[News] = field(default_factory=list)  # sync: each member's state as an item
    epochs: dict[str, int] = field(default_factory=dict)  # sync: each member's catalog epoch
    target: str = ""  # ping-req
    ack: bool = False  # ping-req answer


def _int(v: Any, what: str, low: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v < MAX_INT:
        raise PeerError(f"{what} must be an integer in {low}..2^62")
    return v


def _str(v: Any, what: str, limit: int, required: bool = True) -> str:
    if not isinstance(v, str) or len(v) > limit or (required and not v):
        raise PeerError(f"{what} must be a string of 1..{limit} characters")
    return v


def parse_message(data: dict[str, Any] | bytes, what: str = "membership message") -> Message:
    """A body (raw bytes or decoded JSON) as a `Message`; PeerError when it breaks the bounds."""
    d = parse_json_body(data, what) if isinstance(data, bytes | bytearray) else data
    if not isinstance(d, dict):
        raise PeerError(f"{what} must be a JSON object")
    news_raw = d.get("news", [])
    if not isinstance(news_raw, list) or len(news_raw) > MAX_NEWS:
        raise PeerError(f"{what}: 'news' must be a list of at most {MAX_NEWS} items")
    known_raw = d.get("known", [])
    if not isinstance(known_raw, list) or len(known_raw) > MAX_KNOWN:
        raise PeerError(f"{what}: 'known' must be a list of at most {MAX_KNOWN} items")
    members_raw = d.get("members", [])
    if not isinstance(members_raw, list) or len(members_raw) > MAX_MEMBERS:
        raise PeerError(f"{what}: 'members' must be a list of at most {MAX_MEMBERS} entries")
    members: list[News] = []
    epochs: dict[str, int] = {}
    for i, e in enumerate(members_raw):
        w = f"{what}: members[{i}]"
        if not isinstance(e, list) or len(e) != 5:
            raise PeerError(f"{w} must be [node id, uri, incarnation, state, epoch]")
        node = _str(e[0], f"{w} node id", MAX_ID)
        uri = _str(e[1], f"{w} uri", MAX_URI, required=e[3] == ALIVE)
        if e[3] not in MEMBER_KINDS:
            raise PeerError(f"{w} state {e[3]!r} is not one of {', '.join(MEMBER_KINDS)}")
        members.append(News(e[3], node, _int(e[2], f"{w} incarnation"), uri))
        epochs[node] = _int(e[4], f"{w} epoch", -1)
    return Message(
        sender=_str(d.get("from"), f"{what}: 'from'", MAX_ID),
        incarnation=_int(d.get("inc"), f"{what}: 'inc'"),
        uri=_str(d.get("uri"), f"{what}: 'uri'", MAX_URI),
        epoch=_int(d.get("epoch", -1), f"{what}: 'epoch'", -1),
        fleet=_str(d.get("fleet", ""), f"{what}: 'fleet'", MAX_ID, required=False),
        news=[news_from_wire(x, f"{what}: news[{i}]") for i, x in enumerate(news_raw)],
        known=[news_from_wire(x, f"{what}: known[{i}]") for i, x in enumerate(known_raw)],
        members=members,
        epochs=epochs,
        target=_str(d.get("target", ""), f"{what}: 'target'", MAX_ID, required=False),
        ack=d.get("ack") is True,
    )


__all__ = [
    "ACTIONS",
    "ACTION_PING",
    "ACTION_PING_REQ",
    "ACTION_SYNC",
    "MAX_KNOWN",
    "MAX_MEMBERS",
    "MAX_NEWS",
    "Message",
    "parse_message",
]
