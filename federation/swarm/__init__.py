"""The piece swarm: a format-2 card fetched from several holders at once, piece by piece,
and served by every node from the pieces it has verified (docs/protocol.md, "Swarm").

`wire` (ticket, bitfield and have forms), `scheduler` (the pure piece picker), `partial`
(a card's verified pieces, kept in the store's pieces/ so a restarted fetch resumes),
`service` (a node's side: serving, who holds what, upload caps) and `fetch` (the fetch loop).
"""

from __future__ import annotations

from .fetch import SwarmConfig, SwarmFetch, read_pieces, swarm_fetch, wants_swarm
from .partial import PartialCard
from .scheduler import PieceScheduler, Request, SchedulerConfig
from .service import SwarmLimits, SwarmService
from .wire import ACTION_HAVE, PIECES_KEY, HaveItem, parse_piece_ticket, piece_ticket, serves_pieces

__all__ = [
    "ACTION_HAVE",
    "PIECES_KEY",
    "HaveItem",
    "PartialCard",
    "PieceScheduler",
    "Request",
    "SchedulerConfig",
    "SwarmConfig",
    "SwarmFetch",
    "SwarmLimits",
    "SwarmService",
    "parse_piece_ticket",
    "piece_ticket",
    "read_pieces",
    "serves_pieces",
    "swarm_fetch",
    "wants_swarm",
]
