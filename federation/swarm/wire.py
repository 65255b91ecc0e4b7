"""The swarm's wire forms (docs/protocol.md, "Swarm: pieces from many holders"). Pure.

- A **piece ticket** asks a `DoGet` for a range of pieces of one format-2 card:
  ``b"pieces:<digest>:<first>:<count>"``, or with ``:last`` appended when the asker has no
  other holder left for them (a node then serves even pieces it would refer elsewhere).
  The answer is the card schema (header in its metadata) and one record batch per piece
  the server holds verified in that range, in order, each with app_metadata
  ``{"piece": i}``; pieces it does not hold are left out.
- A **bitfield** says which pieces a holder has: lowercase hex of ceil(n/8) bytes, bit
  ``i % 8`` (least significant first) of byte ``i // 8`` = piece i; or the word
  ``"complete"``.
- A **have** (`DoAction` ``have``) tells a peer which pieces the sender holds now:
  ``{"digest": hex, "peer": uri, "pieces": bitfield, "count": n}``; the same item is
  what gossip may carry later (`HaveItem`).
- **Holders in listings**: a `FlightInfo` endpoint's ``app_metadata`` may carry
  ``{"holders": {uri: bitfield}}`` (partial holders the listing node knows of); older
  readers ignore it.
- `health` and `node-info` carry ``"pieces": 1`` on nodes that serve piece tickets; no
  piece ticket is ever sent to a node without it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from loraflight.engine.card import check_digest
from loraflight.errors import CardError, PeerError

from ..protocol import ACTION_HAVE, holders_metadata, parse_holders

PIECES_KEY = "pieces"  # health / node-info: this node serves piece tickets (value 1)
PIECE_PREFIX = b"pieces:"
COMPLETE = "complete"
MAX_PIECES = 8192  # docs/format.md section 11


def piece_ticket(digest: str, first: int, count: int, *, last: bool = False) -> bytes:
    """The DoGet ticket for pieces first .. first+count-1 of `digest`."""
    check_digest(digest)
    if not (0 <= first < MAX_PIECES and 1 <= count <= MAX_PIECES - first):
        raise CardError(f"a piece range is 0 <= first < {MAX_PIECES} and 1 <= count, not {first}+{count}")
    return PIECE_PREFIX + f"{digest}:{first}:{count}{':last' if last else ''}".encode("ascii")


@dataclasses.dataclass(frozen=True)
class PieceRequest:
    digest: str
    first: int
    count: int
    last: bool = False

    @property
    def indexes(self) -> range:
        return range(self.first, self.first + self.count)


def parse_piece_ticket(ticket: bytes) -> PieceRequest | None:
    """The request a piece ticket makes, or None for any other ticket."""
    raw = bytes(ticket)
    if not raw.startswith(PIECE_PREFIX):
        return None
    bad = CardError(
        "piece ticket must be b'pieces:<64 hex digest>:<first piece>:<count>[:last]' (decimal integers)"
    )
    try:
        parts = raw[len(PIECE_PREFIX) :].decode("ascii").split(":")
    except UnicodeDecodeError:
        raise bad from None
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "last"):
        raise bad
    if not all(p.isdigit() and len(p) <= 5 for p in parts[1:3]):
        raise bad
    first, count = int(parts[1]), int(parts[2])
    if not (0 <= first < MAX_PIECES and 1 <= count <= MAX_PIECES - first):
        raise CardError(f"piece range {first}+{count} is outside 0..{MAX_PIECES - 1}")
    return PieceRequest(check_digest(parts[0]), first, count, len(parts) == 4)


def piece_metadata(index: int) -> bytes:
    return json.dumps({"piece": index}).encode()


def parse_piece_metadata(raw: Any) -> int:
    """The piece index a piece batch's app_metadata names (PeerError when it names none)."""
    try:
        data = json.loads(bytes(raw).decode("utf-8")) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        data = None
    i = data.get("piece") if isinstance(data, dict) else None
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_PIECES:
        raise PeerError('a piece batch must carry app_metadata {"piece": index}')
    return i


# ------------------------------------------------------------------ bitfields


def encode_bits(have: Iterable[int], n: int) -> str:
    """The bitfield of the pieces `have` of a card of `n` pieces (`COMPLETE` when all)."""
    out = bytearray((n + 7) // 8)
    count = 0
    for i in set(have):
        if not 0 <= i < n:
            raise CardError(f"piece {i} does not exist in a card of {n} pieces")
        out[i // 8] |= 1 << (i % 8)
        count += 1
    return COMPLETE if count == n and n > 0 else out.hex()


def decode_bits(text: object, n: int) -> frozenset[int]:
    """The pieces a bitfield names (PeerError when it is malformed or names a piece past `n`)."""
    if text == COMPLETE:
        return frozenset(range(n))
    if not isinstance(text, str) or len(text) != 2 * ((n + 7) // 8):
        raise PeerError(f"a bitfield of {n} pieces is {(n + 7) // 8} bytes of hex or 'complete'")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise PeerError("a bitfield must be lowercase hex") from None
    have = frozenset(i for i in range(len(raw) * 8) if raw[i // 8] >> (i % 8) & 1)
    if any(i >= n for i in have):
        raise PeerError(f"a bitfield names pieces past the card's {n}")
    return have


# ------------------------------------------------------------------ have / holders


@dataclasses.dataclass(frozen=True)
class HaveItem:
    """Which pieces of `digest` the node at `peer` holds (all of them when `complete`)."""

    digest: str
    peer: str
    pieces: frozenset[int]
    count: int  # pieces in the card

    @property
    def complete(self) -> bool:
        return len(self.pieces) == self.count

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "peer": self.peer,
            "pieces": encode_bits(self.pieces, self.count),
            "count": self.count,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> HaveItem:
        digest, peer, n = raw.get("digest"), raw.get("peer"), raw.get("count")
        if not isinstance(digest, str) or not isinstance(peer, str) or "://" not in peer or len(peer) > 512:
            raise CardError('have body must be {"digest": hex, "peer": uri, "pieces": bitfield, "count": n}')
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PIECES:
            raise CardError(f"have 'count' must be the card's number of pieces, 1..{MAX_PIECES}")
        try:
            pieces = decode_bits(raw.get("pieces"), n)
        except PeerError as e:
            raise CardError(f"have 'pieces': {e}") from None
        return cls(check_digest(digest), peer, pieces, n)


def serves_pieces(health: Mapping[str, Any]) -> bool:
    """Whether a peer's `health`/`node-info` says it serves piece tickets."""
    v = health.get(PIECES_KEY)
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


__all__ = [
    "ACTION_HAVE",
    "COMPLETE",
    "MAX_PIECES",
    "PIECES_KEY",
    "PIECE_PREFIX",
    "HaveItem",
    "PieceRequest",
    "decode_bits",
    "encode_bits",
    "holders_metadata",
    "parse_holders",
    "parse_piece_metadata",
    "parse_piece_ticket",
    "piece_metadata",
    "piece_ticket",
    "serves_pieces",
]
