"""A node's swarm: the cards it is fetching piece by piece (served while they arrive), who
holds which pieces (from `have` actions and listings), and the upload side of piece tickets
(caps per node and per peer; a complete holder refers askers to other holders).

Upload rules (docs/protocol.md, "Swarm"): at most `max_uploads` piece streams at once and
`max_uploads_per_peer` to one asking address, beyond which a request is refused as busy.
A node holding the whole card leaves a piece out of its answer (the asker goes elsewhere)
once it is sending or has sent that piece to anyone, unless the ticket is marked ``last``
(the asker has no other holder left for it): such a ticket is answered 'busy' while the
piece is on its way to another peer, and served otherwise. So an origin sends each piece about
once and the fleet sends the copies; once it has sent every piece, it sends up to
`origin_extra` of the card again (fetchers ask an origin only when no other holder of the
piece is free: its uplink, idle by then, helps with the last pieces). A node that got the
card through the swarm (a copy) serves every asker (`fetched`). A request waits up to
`upload_wait_s` for a free slot before 'busy'; a referral (nothing to send) is answered at
once, without a slot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from loraflight.engine.card import LoRACard
from loraflight.errors import BusyError, CardNotFound

from ..pause import pause_point
from ..store import Store
from .partial import PartialCard
from .wire import HaveItem, PieceRequest, encode_bits, piece_metadata

log = logging.getLogger(__name__)
HAVE_TTL_S = 600.0
MAX_TRACKED_DIGESTS = 1024
MAX_HOLDERS_PER_DIGEST = 256


@dataclasses.dataclass(frozen=True)
class SwarmLimits:
    # piece streams this node sends at once: few, so each piece lands (and is re-shared) soon
    max_uploads: int = 1
    max_uploads_per_peer: int = 1  # of them to one asking address
    # a request waits this long for a free upload slot before 'busy': the uplink goes on to
    # the next piece at once instead of idling until some asker retries
    upload_wait_s: float = 0.25
    # an origin that has sent every piece of a card once sends up to this share of the card again
    # (to askers whose other holders of a piece are all busy): its idle uplink helps in the tail
    origin_extra: float = 0.25


class _Uploads:
    """Per card: how often this node sent each piece, and which are being sent now."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        self.sending: dict[int, int] = {}


class SwarmService:
    """Owned by a `CardServer` (`server.swarm`); a node sets `peer_uris` to its live peers."""

    def __init__(self, store: Store, limits: SwarmLimits | None = None) -> None:
        self.store = store
        self.limits = limits or SwarmLimits()
        # what this node's swarm fetches run with (`fetch.SwarmConfig`; None: its defaults)
        self.fetch_config: Any = None
        self.self_uris: Callable[[], list[str]] = list
        self.peer_uris: Callable[[], list[str]] = list
        # Which addresses may be asked for pieces, or believed in a `have` (a node: its confirmed
        # peers, and mDNS peers in an open fleet; docs/operations.md "Security model").
        self.may_use: Callable[[str], bool] = lambda uri: True
        self._lock = threading.Condition()
        self._partials: dict[str, PartialCard] = {}
        self._fetches: dict[str, Any] = {}  # digest -> the running SwarmFetch
        self._haves: dict[str, dict[str, tuple[frozenset[int], int, float]]] = {}
        self._uploads: dict[str, _Uploads] = {}
        self._active = 0
        self._per_peer: dict[str, int] = {}
        self.closed = False  # set by the server's stop: running fetches give up
        self.piece_support: dict[str, bool] = {}  # uri -> whether its health says it serves pieces
        # cards this node got through the swarm: it serves their pieces to anyone who asks (a copy
        # in the fleet, not an origin, need not spare its uplink); bounded, oldest forgotten first
        self._copies: dict[str, None] = {}
        self.served_pieces = 0
        self.referred = 0
        self.forced = 0  # pieces sent again because the asker had no other holder left
        self.resumed_pieces = 0  # pieces fetches here picked up from the store's kept pieces

    def close(self) -> None:
        """Stop: running swarm fetches end (their verified pieces stay kept in the store)."""
        self.closed = True
        with self._lock:
            self._lock.notify_all()

    # -- partial cards and fetches
    def register(self, partial: PartialCard, fetch: Any) -> Any:
        """Start serving `partial`; returns the fetch already running for this digest, if any."""
        d = partial.entry.digest
        with self._lock:
            running = self._fetches.get(d)
            if running is not None:
                return running
            self._partials[d] = partial
            self._fetches[d] = fetch
        return None

    def unregister(self, digest: str) -> None:
        with self._lock:
            self._partials.pop(digest, None)
            self._fetches.pop(digest, None)
            self._lock.notify_all()

    def fetched(self, digest: str) -> None:
        """`digest` was stored by a swarm fetch here: its pieces are never referred elsewhere."""
        with self._lock:
            self._copies[digest] = None
            while len(self._copies) > MAX_TRACKED_DIGESTS:
                self._copies.pop(next(iter(self._copies)))

    def fetch_of(self, digest: str) -> Any:
        with self._lock:
            return self._fetches.get(digest)

    def fetching(self) -> list[str]:
        """The digests being fetched here now."""
        with self._lock:
            return list(self._partials)

    def count_resumed(self, pieces: int) -> None:
        """A fetch here started from `pieces` kept pieces (the status says how many in all)."""
        with self._lock:
            self.resumed_pieces += pieces

    # -- who holds what
    def note_have(self, item: HaveItem) -> None:
        """Record a peer's `have` (bounded; old news expires after HAVE_TTL_S)."""
        now = time.monotonic()
        if item.peer in self.self_uris() or not self.may_use(item.peer):
            return
        with self._lock:
            table = self._haves.get(item.digest)
            if table is None:
                if len(self._haves) >= MAX_TRACKED_DIGESTS:
                    self._expire(now, force=True)
                table = self._haves[item.digest] = {}
            old = table.get(item.peer)
            pieces = item.pieces | old[0] if old is not None and old[1] == item.count else item.pieces
            if item.peer in table or len(table) < MAX_HOLDERS_PER_DIGEST:
                table[item.peer] = (pieces, item.count, now)
            fetch = self._fetches.get(item.digest)
        if fetch is not None:
            fetch.news(item.peer, pieces)

    def _expire(self, now: float, force: bool = False) -> None:
        for d in list(self._haves):
            t = self._haves[d]
            for p in [p for p, v in t.items() if now - v[2] > HAVE_TTL_S]:
                del t[p]
            if not t or force:
                del self._haves[d]
                if force:
                    return

    def holders(self, digest: str) -> dict[str, frozenset[int]]:
        """Peers known to hold pieces of `digest` (from haves), with their pieces."""
        now = time.monotonic()
        with self._lock:
            t = self._haves.get(digest, {})
            return {p: v[0] for p, v in t.items() if now - v[2] <= HAVE_TTL_S}

    def listing_holders(self, digest: str, count: int) -> dict[str, str]:
        """Holders for a listing's endpoint metadata: uri -> bitfield ('complete' for all)."""
        out = {p: encode_bits(s, count) for p, s in self.holders(digest).items() if all(i < count for i in s)}
        with self._lock:
            part = self._partials.get(digest)
        if part is not None:
            mine = part.has()
            if mine:
                for uri in self.self_uris()[:1]:
                    out[uri] = encode_bits(mine, count)
        return out

    # -- serving
    def _card_batches(self, digest: str, mapped: Callable[[str], LoRACard]) -> tuple[Any, Any, int]:
        """(schema, batch-of-piece function, pieces when complete else 0) of what this node holds
        of `digest`."""
        if self.store.entry_exists(digest):
            try:
                card = mapped(digest)
                batches = card.batches
                return batches[0].schema, lambda i: batches[i] if i < len(batches) else None, len(batches)
            except CardNotFound:
                pass
        with self._lock:
            part = self._partials.get(digest)
        if part is None:
            raise CardNotFound(f"no card or partial card with digest {digest[:16]}… here")

        def batch_of(i: int) -> Any:
            # a fetch that ends while this stream waits for its slot commits the card and drops
            # its pieces: the piece is served from the store then, not left out
            b = part.batch(i)
            if b is None and self.store.entry_exists(digest):
                with contextlib.suppress(CardNotFound, IndexError):
                    b = mapped(digest).batches[i]
            return b

        return part.schema, batch_of, 0

    def _take_slot(self, peer: str) -> None:
        deadline = time.monotonic() + self.limits.upload_wait_s
        with self._lock:
            while (
                self._active >= self.limits.max_uploads
                or self._per_peer.get(peer, 0) >= self.limits.max_uploads_per_peer
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BusyError(
                        f"this node is sending {self._active} pieces already ({self._per_peer.get(peer, 0)} "
                        "to you); ask another holder"
                    )
                self._lock.wait(left)
            self._active += 1
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1

    def _give_slot(self, peer: str) -> None:
        with self._lock:
            self._active -= 1
            n = self._per_peer.get(peer, 1) - 1
            if n <= 0:
                self._per_peer.pop(peer, None)
            else:
                self._per_peer[peer] = n
            self._lock.notify_all()

    def _refers(self, req: PieceRequest, i: int, complete: int) -> bool:
        """Whether a complete holder (of `complete` pieces; 0: a partial one) leaves piece `i`
        out: it is sending it, or sent it to another peer (the asker goes to whoever got it)
        unless every piece has gone out once and its extra sends stay within `origin_extra` of
        the card; never for a ticket marked `last`, which `serve` answers 'busy' instead while
        the piece is on its way elsewhere, nor for a card this node got through the swarm (only
        an origin spares its uplink: a copy that referred every asker it had served once would
        leave the last fetchers waiting on referrals). Caller holds the lock."""
        up = self._uploads.get(req.digest)
        if not complete or up is None or req.last or req.digest in self._copies:
            return False
        if up.sending.get(i):
            return True
        if not up.sent.get(i):
            return False
        extra = sum(up.sent.values()) - len(up.sent)
        return len(up.sent) < complete or extra >= int(complete * self.limits.origin_extra)

    def serve(
        self, req: PieceRequest, peer: str, mapped: Callable[[str], LoRACard]
    ) -> tuple[Any, Iterator[Any]]:
        """The (schema, generator of (batch, app_metadata)) answering a piece ticket."""
        full, batch_of, complete = self._card_batches(req.digest, mapped)
        if req.last and complete and req.digest not in self._copies:
            with self._lock:
                up = self._uploads.get(req.digest)
                flying = [i for i in req.indexes if up is not None and up.sending.get(i)]
            if flying:
                raise BusyError(f"piece {flying[0]} is on its way to another peer; ask it of them shortly")
        # no header in the stream's schema: the asker has it from the listing, and a referral
        # (an answer without pieces) then costs a few hundred bytes, not the header's kilobytes
        schema = full.remove_metadata()
        with self._lock:
            refers_all = all(self._refers(req, i, complete) for i in req.indexes)
            if refers_all:
                self.referred += req.count
        if refers_all:  # answered at once: a referral does not wait for the upload slot
            return schema, iter(())
        self._take_slot(peer)

        def stream() -> Iterator[tuple[pa.RecordBatch, pa.Buffer]]:
            try:
                for i in req.indexes:
                    b = batch_of(i)
                    if b is None:
                        continue
                    with self._lock:
                        up = self._uploads.setdefault(req.digest, _Uploads())
                        if len(self._uploads) > MAX_TRACKED_DIGESTS:
                            self._uploads.pop(next(iter(self._uploads)))
                        if self._refers(req, i, complete):
                            self.referred += 1
                            continue
                        if req.last and up.sent.get(i):
                            self.forced += 1
                        up.sending[i] = up.sending.get(i, 0) + 1
                        up.sent[i] = (
                            up.sent.get(i, 0) + 1
                        )  # counted when handed over (a cancel still cost it)
                        self.served_pieces += 1
                    try:
                        yield pa.record_batch(b.columns, schema=schema), pa.py_buffer(piece_metadata(i))
                    finally:
                        with self._lock:
                            up.sending[i] -= 1
                    pause_point("serve_pieces", self.served_pieces)
            finally:
                self._give_slot(peer)

        return schema, stream()

    def status(self) -> dict[str, Any]:
        """For node-info: cards being fetched (pieces held of how many) and uploads."""
        with self._lock:
            parts = list(self._partials.items())
        fetching = {
            d: {"have": len(h), "pieces": p.count, "bits": encode_bits(h, p.count), "resumed": p.resumed}
            for d, p in parts
            for h in (p.has(),)
        }
        now = time.monotonic()
        with self._lock:
            sent = {d: sum(u.sent.values()) for d, u in self._uploads.items()}
            # per card: how many of its pieces the peers' haves name between them
            covered = {
                d: len(frozenset().union(*(v[0] for v in t.values() if now - v[2] <= HAVE_TTL_S)))
                for d, t in self._haves.items()
                if t
            }
            return {
                "fetching": fetching,
                "pieces_sent": sent,
                "held_by_peers": covered,
                "served_pieces": self.served_pieces,
                "referred": self.referred,
                "forced": self.forced,
                "resumed_pieces": self.resumed_pieces,
                "complete_peers": {
                    d: sum(1 for v in t.values() if len(v[0]) == v[1] and now - v[2] <= HAVE_TTL_S)
                    for d, t in self._haves.items()
                },
                "uploading": self._active,
            }


__all__ = ["HAVE_TTL_S", "SwarmLimits", "SwarmService"]
