"""A swarm fetch: one format-2 card from several holders at once, piece by piece.

The loop applies `PieceScheduler`'s rules with a small thread pool: each request is one
piece ticket to one holder, verified as it lands (`partial.check_piece`), kept in a
`PartialCard` (served to others at once) and announced to the node's peers (`have`);
holders that lie, corrupt or stall are avoided for the rest of the fetch. When every piece
is in, the card goes through the store's normal receive and commit, so a kill at any point
leaves no partial card in the store. Verified pieces are kept in the store's pieces/ (see
`partial`): a fetch of a card whose earlier fetch was killed, stopped or failed starts from
the pieces that verify again and asks only for the rest. A fetch that fails for a reason
that is final for the card (withdrawn, refused by the store's admission) deletes them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from loraflight.engine.card import header_digest, verify_signature
from loraflight.errors import (
    BusyError,
    CardError,
    CardNotFound,
    ConflictError,
    LoraflightError,
    PeerError,
    TrustError,
)

from ..protocol import CatalogEntry, dedupe, from_flight_error
from ..store import Store
from .partial import PartialCard, check_piece, schema_problem
from .scheduler import PieceScheduler, Request, SchedulerConfig
from .service import SwarmService
from .wire import HaveItem, decode_bits, parse_piece_metadata, piece_ticket, serves_pieces

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SwarmConfig:
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    piece_timeout_s: float = 10.0  # a piece stream that takes longer stalled (at least this)
    min_rate: float = 1e6  # bytes/s: big pieces get bytes / min_rate seconds if that is longer
    idle_timeout_s: float = 30.0  # no holder for a missing piece this long: the fetch fails
    # no piece landed this long although holders are known (each answers busy or refers, or its
    # slots are held): the fetch fails, and sync fetches the card whole instead
    progress_timeout_s: float = 20.0
    fetch_timeout_s: float = 600.0
    announce_every_s: float = 0.05  # haves to peers at most this often
    max_announce: int = 32  # peers told per announcement
    # a referred piece is asked again as `last` after this many times the median piece time
    # seen in this fetch (within 0.2 s .. the scheduler's referral_wait_s): whoever got the
    # piece has said so by then, or its have was lost or is late
    referral_pieces: float = 3.0


class SwarmFetch:
    """One running swarm fetch of `entry` (see module doc); `run()` returns the stored entry."""

    def __init__(
        self,
        service: SwarmService,
        entry: CatalogEntry,
        connect: Callable[[str], Any],
        *,
        holders: Sequence[str],
        planned: Sequence[str] = (),
        config: SwarmConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.store: Store = service.store
        self.entry = entry
        self.connect = connect
        self.config = config or SwarmConfig()
        self.count = len(entry.header.pieces)
        # the sync plan's locations are vetted already; any other address only if the node may use it
        self._planned = set(planned)
        self._holders = [h for h in holders if self._usable(h)]
        self._rng = rng or random.Random()
        self._news: list[tuple[str, frozenset[int], bool]] = []
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._result: CatalogEntry | None = None
        self._error: LoraflightError | None = None
        self._announcing: set[str] = set()  # peers a have is being sent to now
        self._latest: dict[str, HaveItem] = {}  # the newest have not yet sent, per peer
        self._readers: dict[tuple[str, int], Any] = {}  # (peer, piece) -> its open piece stream
        self._cancelled: set[tuple[str, int]] = set()  # requests ended here: a copy came first
        self.avoided: dict[str, str] = {}

    # -- from other threads
    def news(self, peer: str, pieces: Iterable[int], origin: bool = False) -> None:
        with self._lock:
            self._news.append((peer, frozenset(pieces), origin))
        self._wake.set()

    def wait(self, timeout: float) -> CatalogEntry:
        """The result of a fetch another caller runs (joining it)."""
        if not self._done.wait(timeout):
            raise PeerError(
                f"{self.entry.ref}: the swarm fetch running here did not finish in {timeout:.0f} s"
            )
        if self._error is not None:
            raise type(self._error)(str(self._error))
        assert self._result is not None
        return self._result

    # -- the fetch
    def run(self) -> CatalogEntry:
        partial = PartialCard(self.store, self.entry)
        running = self.service.register(partial, self)
        if running is not None:
            for h in self._holders:
                running.news(h, range(self.count), True)
            return running.wait(self.config.fetch_timeout_s)  # type: ignore[no-any-return]
        final = False
        try:
            self.store.sweep_pieces(keep=self.service.fetching())
            self.service.count_resumed(partial.resume())
            self._result = self._run(partial)
            return self._result
        except LoraflightError as e:
            self._error = e
            final = refused_for_good(e)
            raise
        except Exception as e:
            self._error = PeerError(f"{self.entry.ref}: swarm fetch failed: {e}")
            raise self._error from None
        finally:
            self._done.set()
            self.service.unregister(self.entry.digest)
            # the commit deleted the kept pieces; a fetch that failed keeps them for the next
            # one (a stop, no holder, a timeout), unless the card is refused here for good
            if final:
                partial.discard()
            else:
                partial.close()

    def _me(self) -> str:
        mine = self.service.self_uris()
        return mine[0] if mine else ""

    def _usable(self, uri: str) -> bool:
        return uri in self._planned or self.service.may_use(uri)

    def _run(self, partial: PartialCard) -> CatalogEntry:
        cfg, n, d = self.config, self.count, self.entry.digest
        me = set(self.service.self_uris())
        sched = PieceScheduler(n, have=partial.has(), config=cfg.scheduler, rng=self._rng)
        talk = cf.ThreadPoolExecutor(8, thread_name_prefix="ThreadPoolExecutor-swarm-have")
        for h in self._holders:
            if h in me:
                continue
            if self.service.piece_support.get(h):
                sched.add_holder(h, range(n), origin=True)
            elif h not in self.service.piece_support:  # its health says; asked beside the fetch
                talk.submit(self._probe, h)
        for p, bits in self.entry.holders:
            with contextlib.suppress(PeerError):
                if p not in me and self._usable(p):
                    sched.add_holder(p, decode_bits(bits, n))
        for p, s in self.service.holders(d).items():
            sched.add_holder(p, s)
        piece_bytes = max(1, self.entry.size // n)
        timeout = max(cfg.piece_timeout_s, 1.2 * piece_bytes / cfg.min_rate)
        start = time.monotonic()
        idle_since = last_piece = start
        pool = cf.ThreadPoolExecutor(cfg.scheduler.total + 1, thread_name_prefix="ThreadPoolExecutor-swarm")
        futures: dict[cf.Future[tuple[str, Any, str]], Request] = {}
        dirty, last_told = bool(partial.resumed), 0.0  # resumed pieces are announced at once
        outcomes: dict[str, int] = {}  # how the requests ended (the log line says)
        began: dict[cf.Future[tuple[str, Any, str]], float] = {}
        took: list[float] = []  # seconds each piece that came in took
        try:
            while not sched.complete:
                now = time.monotonic()
                if self.service.closed:
                    raise PeerError(f"{self.entry.ref}: the node is stopping; swarm fetch abandoned")
                if now - start > cfg.fetch_timeout_s:
                    raise PeerError(f"{self.entry.ref}: swarm fetch ran past {cfg.fetch_timeout_s:.0f} s")
                if now - last_piece > cfg.progress_timeout_s:
                    raise PeerError(
                        f"{self.entry.ref}: no piece arrived in {cfg.progress_timeout_s:.0f} s from "
                        f"{len(sched.holders)} holders (requests: "
                        + (" ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "none")
                        + ")"
                    )
                with self._lock:
                    news, self._news = self._news, []
                for peer, pieces, origin in news:
                    if peer not in me:
                        sched.add_holder(peer, pieces, origin=origin and self._serves(peer))
                for req in sched.next_requests(now):
                    fut = pool.submit(self._download, partial, req, timeout)
                    futures[fut], began[fut] = req, now
                if dirty and now - last_told >= cfg.announce_every_s:
                    self._announce(talk, partial.has(), sched)
                    dirty, last_told = False, now
                if not futures:
                    if sched.unavailable() and now - idle_since > cfg.idle_timeout_s:
                        why = "; ".join(f"{p}: {w}" for p, w in sched.avoided.items()) or "none"
                        raise PeerError(
                            f"{self.entry.ref}: no usable holder has pieces {sched.unavailable()[:8]} "
                            f"(waited {cfg.idle_timeout_s:.0f} s; holders avoided: {why})"
                        )
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                idle_since = now
                done, _ = cf.wait(list(futures), timeout=0.05, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    req = futures.pop(f)
                    outcome, batch, detail = f.result()
                    with self._lock:
                        if (req.peer, req.piece) in self._cancelled and outcome != "ok":
                            outcome = "cancelled"
                        self._cancelled.discard((req.peer, req.piece))
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    now = time.monotonic()
                    t_req = began.pop(f, now)
                    if outcome == "ok":
                        took.append(now - t_req)
                        sched.referral_wait_s = referral_wait(took, cfg)
                        path, mapped = batch
                        if sched.finished(req, "ok", now) and partial.keep(req.piece, path, mapped):
                            dirty, last_piece = True, now
                            self._cancel_copies(req, futures.values())
                        else:
                            partial.drop(path)
                        continue
                    sched.finished(req, outcome, now, detail)
                    if outcome in ("bad", "stall") or req.peer in sched.avoided:
                        log.warning(
                            "swarm %s: piece %d from %s refused (%s: %s); avoiding that peer for this fetch",
                            self.entry.ref, req.piece, req.peer, outcome, detail,
                        )  # fmt: skip
            self.avoided = dict(sched.avoided)
            for f in futures:
                f.cancel()
            # a copy serves every asker (from its pieces now, from the store once committed);
            # the peers hear it is complete while it commits
            self.service.fetched(self.entry.digest)
            told = self._announce(talk, partial.has(), sched)
            sources = dedupe(sched.sources[i] for i in range(n) if i in sched.sources)
            from_origins = sum(1 for i in range(n) if sched.sources.get(i) in sched.origins)
            log.info(
                "swarm %s: %d pieces (%d resumed) from %d holders (%d from origins) in %.2f s; "
                "requests %s; avoided: %s",
                self.entry.ref, n, partial.resumed, len(sources), from_origins, time.monotonic() - start,
                " ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
                ", ".join(sched.avoided) or "none",
            )  # fmt: skip
            locations = dedupe([*self.service.self_uris(), *self._holders, *sources])
            stored = partial.commit(source=sources[0] if sources else "swarm", locations=locations)
            cf.wait(told, timeout=2.0)
            return stored
        finally:
            self.avoided = dict(sched.avoided)
            pool.shutdown(wait=False, cancel_futures=True)
            talk.shutdown(wait=False, cancel_futures=True)

    def _probe(self, uri: str) -> None:
        if self._serves(uri):
            self.news(uri, range(self.count), origin=True)

    def _serves(self, uri: str) -> bool:
        """Whether `uri` serves piece tickets (its health says; cached on the service)."""
        known = self.service.piece_support.get(uri)
        if known is not None:
            return known
        try:
            ok = serves_pieces(self.connect(uri).health())
        except LoraflightError:
            return False
        self.service.piece_support[uri] = ok
        return ok

    def _cancel_copies(self, got: Request, flying: Iterable[Request]) -> None:
        """Piece `got.piece` is in: end the other requests for it (endgame copies), so their
        holders' uplinks go on to pieces someone still needs."""
        with self._lock:
            for r in flying:
                if r.piece == got.piece and r.peer != got.peer:
                    self._cancelled.add((r.peer, r.piece))
                    reader = self._readers.get((r.peer, r.piece))
                    if reader is not None:
                        with contextlib.suppress(Exception):
                            reader.cancel()

    def _opened(self, req: Request, reader: Any) -> None:
        with self._lock:
            self._readers[(req.peer, req.piece)] = reader
            cancelled = (req.peer, req.piece) in self._cancelled
        if cancelled:
            with contextlib.suppress(Exception):
                reader.cancel()

    def _download(self, partial: PartialCard, req: Request, timeout: float) -> tuple[str, Any, str]:
        """One piece from one holder: (outcome, (piece file, mapped batch) verified or None, detail)."""
        try:
            return self._download_one(partial, req, timeout)
        finally:
            with self._lock:
                self._readers.pop((req.peer, req.piece), None)

    def _download_one(self, partial: PartialCard, req: Request, timeout: float) -> tuple[str, Any, str]:
        h = self.entry.header
        try:
            ticket = piece_ticket(h.digest, req.piece, 1, last=req.last)
            chunks = read_pieces(
                self.connect(req.peer),
                ticket,
                timeout=timeout,
                limit=1,
                opened=lambda r: self._opened(req, r),
            )
            for meta, batch in chunks:
                i = parse_piece_metadata(meta)
                if i != req.piece:
                    return "bad", None, f"sent piece {i} when asked for piece {req.piece}"
                why = schema_problem(h, i, batch)
                if why is not None:
                    return "bad", None, why
                path, mapped = partial.write(i, batch)  # aligned: Flight's buffers often are not
                try:
                    check_piece(h, i, mapped)
                except BaseException:
                    partial.drop(path)
                    raise
                return "ok", (path, mapped), ""
            return "missing", None, "left the piece out"
        except BusyError as e:
            return "busy", None, str(e)
        except CardNotFound as e:  # it holds no such card (any more): as if it left the piece out
            return "missing", None, str(e)
        except CardError as e:
            return "bad", None, str(e)
        except PeerError as e:
            return ("stall" if "timed out" in str(e) else "error"), None, str(e)
        except LoraflightError as e:
            return "error", None, str(e)

    def _announce(
        self, talk: cf.ThreadPoolExecutor, have: frozenset[int], sched: PieceScheduler
    ) -> list[cf.Future[None]]:
        """Tell the peers which pieces are here now; the sends started (coalesced per peer)."""
        me = self._me()
        if not me or not have:
            return []
        body = HaveItem(self.entry.digest, me, have, self.count)
        mine = set(self.service.self_uris())
        targets = [
            u for u in dedupe([*self.service.peer_uris(), *sched.holders, *self._holders]) if u not in mine
        ]
        if len(targets) > self.config.max_announce:
            targets = self._rng.sample(targets, self.config.max_announce)
        futs = []
        for uri in targets:
            with self._lock:
                self._latest[uri] = body  # a send in flight to `uri` sends this next (coalesced)
                if uri in self._announcing:
                    continue
                self._announcing.add(uri)
            futs.append(talk.submit(self._tell, uri))
        return futs

    def _tell(self, uri: str) -> None:
        """Send `uri` the newest have for it until none is left (one sender per peer)."""
        for _ in range(10_000):
            with self._lock:
                body = self._latest.pop(uri, None)
                if body is None:
                    self._announcing.discard(uri)
                    return
            try:
                self.connect(uri).have(body)
            except LoraflightError as e:
                log.debug("have to %s failed: %s", uri, e)
        with self._lock:
            self._announcing.discard(uri)


def read_pieces(
    client: Any, ticket: bytes, *, timeout: float, limit: int, opened: Callable[[Any], None] | None = None
) -> list[tuple[Any, Any]]:
    """The (app_metadata, batch) chunks answering a piece ticket, at most `limit`, read to the end
    of the stream (its holder counts what it sent); unverified. Errors map onto ours. `opened`
    gets the stream's reader as soon as it is open (another thread may `cancel()` it)."""
    where = f"{client.uri} do_get pieces"
    try:
        reader = client.do_get(ticket, timeout=timeout)
        if opened is not None:
            opened(reader)
        out: list[tuple[Any, Any]] = []
        try:
            for _ in range(limit + 1):
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    return out
                if chunk.data is not None:
                    out.append((chunk.app_metadata, chunk.data))
            raise PeerError(f"{where}: sent more than the {limit} pieces asked for")
        except BaseException:
            with contextlib.suppress(Exception):
                reader.cancel()
            raise
    except (flight.FlightError, pa.ArrowException) as e:
        raise from_flight_error(e, where) from None


def refused_for_good(error: LoraflightError) -> bool:
    """Whether a swarm fetch that failed with `error` deletes its kept pieces: the store's
    admission refused the card, whatever peer sends it (withdrawn or a name@version conflict:
    `ConflictError`; its trust policy: `TrustError`). Anything else keeps them for the next
    fetch: a stop, timeouts, busy or unreachable holders, a full disk, a listing that lies."""
    return isinstance(error, ConflictError | TrustError)


def referral_wait(took: Sequence[float], config: SwarmConfig) -> float:
    """The referral wait for pieces that took `took` seconds each (see SwarmConfig)."""
    ceiling = config.scheduler.referral_wait_s
    if not took:
        return ceiling
    typical = sorted(took)[len(took) // 2]
    return min(ceiling, max(min(0.2, ceiling), config.referral_pieces * typical))


def spreads_by_swarm(entry: CatalogEntry) -> bool:
    """Whether peers fetch `entry` piece by piece (when more than one may hold it): a format-2
    card of several pieces."""
    return entry.header.major >= 2 and len(entry.header.pieces) >= 2


def wants_swarm(service: SwarmService | None, entry: CatalogEntry, locations: Sequence[str]) -> bool:
    """Whether `entry` is fetched by the swarm: a format-2 card of several pieces, on a node
    with a swarm, when more than one peer may hold pieces of it (its holders, partial holders
    known, and the node's other peers, which may be fetching it too). Else whole-card."""
    if service is None or not spreads_by_swarm(entry):
        return False
    mine = set(service.self_uris())
    if not service.self_uris():
        return False
    may_hold = {
        *locations,
        *entry.locations,
        *(p for p, _ in entry.holders),
        *service.holders(entry.digest),
        *service.peer_uris(),
    } - mine
    return len(may_hold) >= 2


def swarm_fetch(
    service: SwarmService,
    entry: CatalogEntry,
    connect: Callable[[str], Any],
    *,
    locations: Sequence[str] = (),
    trusted: Iterable[str] | None = None,
    require_signed: bool = False,
    config: SwarmConfig | None = None,
) -> CatalogEntry:
    """Fetch `entry` through the swarm into the service's store; the stored entry.

    Trust and admission are checked on the header before any piece is asked for.
    """
    if header_digest(entry.header) != entry.digest:
        raise CardError(f"{entry.ref}: the listed header does not hash to its digest; refused")
    verify_signature(entry.header, None if trusted is None else set(trusted), require_signed=require_signed)
    try:
        existing = service.store.check_admission(entry.header)
    except LoraflightError as e:
        if refused_for_good(e):  # kept pieces of it are of no use
            service.store.pieces.drop(entry.digest)
        raise
    if existing is not None:
        return existing
    holders = dedupe([*locations, *entry.locations])
    config = config or service.fetch_config
    return SwarmFetch(service, entry, connect, holders=holders, planned=locations, config=config).run()


__all__ = [
    "SwarmConfig",
    "SwarmFetch",
    "read_pieces",
    "referral_wait",
    "refused_for_good",
    "spreads_by_swarm",
    "swarm_fetch",
    "wants_swarm",
]
