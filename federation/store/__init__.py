"""The node's card store: card files named by digest plus a SQLite index of their headers.

`Store` (module `store`) is the facade everything else uses. Behind it: `index` (the
SQLite index, the only SQL), `staging` (receiving a card: temp file, hashing and writing
threads), `values` (value checks and hashing of received batches), `eviction` (which
cards the LRU cap may take, as pure functions), `disk` (disk errors, writeback hints,
group-committed directory fsyncs) and `pieces` (verified pieces of cards being fetched,
kept across restarts for the swarm's resume; `Store.pieces`).
"""

from __future__ import annotations

from .bundle import BundleReceiver, GroupTarget, VerifiedFile
from .index import MAX_LOCATIONS, CardIndex
from .pieces import KeptCard, KeptPieces
from .staging import StagedCard, StagingTarget
from .store import TOUCH_INTERVAL_S, Listener, Store
from .values import check_batch_finite, hash_batch

__all__ = [
    "MAX_LOCATIONS",
    "TOUCH_INTERVAL_S",
    "BundleReceiver",
    "CardIndex",
    "GroupTarget",
    "KeptCard",
    "KeptPieces",
    "Listener",
    "StagedCard",
    "StagingTarget",
    "Store",
    "VerifiedFile",
    "check_batch_finite",
    "hash_batch",
]
