"""Python client of a loraflight node: list, fetch (verified), publish, delete, health.

A fetch hashes the card while it arrives, stops at the advertised size and at a deadline,
and checks digest and trust before anything is stored; it walks every location of the card
(failover) and retries transient errors with backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

import pyarrow as pa
import pyarrow.flight as flight

from loraflight.engine.card import (
    READ_MAJORS,
    CardHeader,
    LoRACard,
    verify_signature,
)
from loraflight.errors import (
    CardError,
    ConflictError,
    LoraflightError,
    PeerError,
    StoreError,
    TrustError,
)

from .client_bundle import fetch_bundle
from .client_io import (
    CONTROL_MESSAGE_BYTES,
    DATA_MESSAGE_BYTES,
    READ_TIMEOUT_S,
    StallGuard,
    connect,
    list_infos,
    node_action,
    receive_to_memory,
)
from .connections import ConnectionPool
from .protocol import (
    ACTION_DELETE,
    ACTION_HAVE,
    ACTION_HEALTH,
    ACTION_HELLO,
    ACTION_NODE_INFO,
    ACTION_NOTIFY,
    ACTION_WITHDRAW,
    ACTION_WITHDRAWALS,
    LIST_ACTION_KEY,
    LISTING_HEADER_BYTES,
    LISTING_HEADER_KEY,
    MAX_CARD_BYTES,
    PUBLISH_OP,
    CatalogEntry,
    Criteria,
    advertised_get_many,
    advertised_get_streams,
    check_protocol,
    dedupe,
    entry_from_flight_info,
    from_flight_error,
    is_transient,
    is_unreachable,
    truncated_ref,
)
from .security import ClientTLS, call_headers
from .server import normalize_uri
from .store import Store
from .withdrawal import Withdrawal, new_withdrawal, parse_ref

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes received, bytes advertised)
MAX_LOCATIONS_TRIED = 3  # a listing may name any host:port: only a few are tried per card
CONNECT_DEADLINE_S = 2.0  # a location other than the lister must answer `health` this fast


_HELD_MAX = 8  # pooled connections one client keeps open at most (the newest)


class Client:
    """A connection to one node (and, for failover, to the other holders it lists)."""

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        tls: ClientTLS | None = None,
        timeout: float = 30.0,
        *,
        retries: int = 2,
        backoff: float = 0.1,
        max_entries: int = 100_000,
        fetch_timeout: float = 600.0,
        max_card_bytes: int = MAX_CARD_BYTES,
        read_timeout: float = READ_TIMEOUT_S,
        max_list_header_bytes: int = 256 << 20,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.uri = normalize_uri(uri, tls is not None)
        self.token = token
        self.tls = tls
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_entries = max_entries
        self.fetch_timeout = fetch_timeout
        # a peer's advertised size bounds a transfer, and this local limit bounds what it may advertise
        self.max_card_bytes = max_card_bytes
        self.read_timeout = read_timeout  # a stream read bringing nothing this long fails the transfer
        self.max_list_header_bytes = max_list_header_bytes  # header bytes one listing may bring in all
        # a node's kept connections (asked for at every call), else this client's own
        self._pool = pool
        self._own = None if pool is not None else connect(self.uri, tls, CONTROL_MESSAGE_BYTES)
        self._data_conn: flight.FlightClient | None = None  # do_get and do_put (see client_io)
        self._held: dict[int, flight.FlightClient] = {}  # pooled ones this client used: kept open
        self._peers: dict[str, Client] = {}
        self._lock = threading.Lock()
        self._checked = False
        self._peer_formats: object = None  # the card format majors the node reads (its health says)
        self._get_many = 0  # cards per bundle the node serves (its health says; 0: card by card)
        self._get_streams = 0  # do_get streams it lets one client run at once (0: not said)
        self._header_max: int | None = None  # header bytes per listing entry, when the node truncates
        self._list_action = False  # the node serves listings as the `list` action (its health says)
        self._unreachable = False  # as another location of a card: its `health` failed (`_peer`)

    # -- lifecycle
    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for p in peers:
            p.close()
        self._held = {}  # the pool's connections: let go (they close when nothing holds them)
        if self._own is not None:
            self._own.close()
        if self._data_conn is not None:
            self._data_conn.close()

    @property
    def _conn(self) -> flight.FlightClient:
        """The connection for listings, infos and actions (see client_io)."""
        if self._pool is not None:
            return self._hold(self._pool.get(self.uri, self.tls, CONTROL_MESSAGE_BYTES))
        assert self._own is not None
        return self._own

    def _data(self) -> flight.FlightClient:
        """The connection for card bytes (larger messages allowed than on the control one)."""
        if self._pool is not None:
            return self._hold(self._pool.get(self.uri, self.tls, DATA_MESSAGE_BYTES))
        with self._lock:
            if self._data_conn is None:
                self._data_conn = connect(self.uri, self.tls, DATA_MESSAGE_BYTES)
            return self._data_conn

    def _hold(self, conn: flight.FlightClient) -> flight.FlightClient:
        """Keep a pooled connection open while this client lives: a stream it returned reads
        from it after the call, and the pool may let go of it meanwhile (connections)."""
        held = self._held
        if held.setdefault(id(conn), conn) is conn and len(held) > _HELD_MAX:
            del held[next(iter(held))]  # a long-lived client whose peer was re-dialled often
        return conn

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.uri!r})"

    def stream(self, digest: str) -> flight.FlightStreamReader:
        """The raw Flight stream of a card (no verification, no retries: for measuring transport)."""
        return self._data().do_get(flight.Ticket(digest.encode()), self._opts())

    def _opts(self, timeout: float | None = None) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(
            timeout=self.timeout if timeout is None else timeout, headers=call_headers(self.token)
        )

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` with retries (backoff) on transient errors; map Flight errors to ours."""
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except flight.FlightError as e:
                last = e
                if self._pool is not None and is_unreachable(e):
                    self._pool.drop(self.uri)  # the next call dials afresh (a busy peer keeps its)
                if not is_transient(e) or attempt == self.retries:
                    raise from_flight_error(e, f"{self.uri} {what}") from None
            except pa.ArrowException as e:
                raise PeerError(f"{self.uri} {what}: {e}") from None
            time.sleep(self.backoff * (2**attempt))
        raise from_flight_error(last or RuntimeError("no attempt"), f"{self.uri} {what}")

    def _action(
        self, kind: str, body: dict[str, Any] | None = None, *, payload: bytes | None = None
    ) -> dict[str, Any]:
        """One action whose answer is one JSON object (`payload`: a body already serialised)."""
        if payload is None:
            payload = json.dumps(body).encode() if body is not None else b""

        def run() -> list[bytes]:
            first = next(iter(self._conn.do_action(flight.Action(kind, payload), self._opts())), None)
            return [] if first is None else [first.body.to_pybytes()]

        out = self._call(kind, run)
        if not out:
            raise PeerError(f"{self.uri} answered {kind} with nothing")
        try:
            data = json.loads(out[0])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PeerError(f"{self.uri} answered {kind} with invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise PeerError(f"{self.uri} answered {kind} with a non-object")
        return data

    def _ensure_compatible(self) -> None:
        if not self._checked:
            recent = self._pool.recent_health(self.uri) if self._pool is not None else None
            if recent is None:
                self.health()
            else:  # the peer answered `health` on this node's connection a moment ago
                self._learn(recent)

    # -- actions
    def health(self) -> dict[str, Any]:
        """Liveness; also refuses a node of another protocol major version."""
        h = self._action(ACTION_HEALTH)
        self._learn(h)
        if self._pool is not None:
            self._pool.remember_health(self.uri, h)
        return h

    def _learn(self, h: dict[str, Any]) -> None:
        """What a `health` answer says about the node (protocol checked; formats, bundles, listings)."""
        check_protocol(str(h.get("protocol", "")), who=f"node {self.uri}")
        self._checked = True
        self._peer_formats = h.get("formats")
        self._get_many = advertised_get_many(h)
        self._get_streams = advertised_get_streams(h)
        self._list_action = h.get(LIST_ACTION_KEY) == 1
        hm = h.get(LISTING_HEADER_KEY)
        self._header_max = None
        if isinstance(hm, int) and not isinstance(hm, bool) and hm > 0:
            self._header_max = min(hm, LISTING_HEADER_BYTES)

    def have(self, item: Any) -> dict[str, Any]:  # a swarm.HaveItem: the pieces of a card held here
        return self._action(ACTION_HAVE, item.to_dict())

    def do_get(self, ticket: bytes, *, timeout: float) -> flight.FlightStreamReader:
        """The raw Flight stream of any ticket, no retries (the swarm's piece tickets), on the data
        connection: a piece is up to a card batch (4 MiB and more), past the control one's limit."""
        return self._data().do_get(flight.Ticket(ticket), self._opts(timeout=timeout))

    def node_info(self) -> dict[str, Any]:
        info = self._action(ACTION_NODE_INFO)
        check_protocol(str(info.get("protocol", "")), who=f"node {self.uri}")
        self._checked = True
        return info

    def hello(self, body: dict[str, Any]) -> dict[str, Any]:
        """The fleet-secret challenge (`fleet_auth.hello_request` builds `body`); its answer."""
        return self._action(ACTION_HELLO, body)

    def notify(self, peer_uri: str, epoch: int) -> dict[str, Any]:
        """Tell the node that `peer_uri`'s catalog changed (it may sync from it now)."""
        return self._action(ACTION_NOTIFY, {"peer": peer_uri, "epoch": int(epoch)})

    def delete(
        self, digest: str | None = None, *, name: str | None = None, version: int | str = "latest"
    ) -> dict[str, Any]:
        """Remove a card on the node (needs a write token)."""
        if digest is None and name is None:
            raise CardError("delete needs a digest or a name")
        body: dict[str, Any] = {"digest": digest} if digest else {"name": name, "version": version}
        return self._action(ACTION_DELETE, body)

    def withdraw(self, ref: str | Withdrawal, key: Any = None, *, reason: str = "") -> dict[str, Any]:
        """Publish a withdrawal of `ref` ("NAME@VERSION", signed here by `key`, an
        Ed25519PrivateKey or a private key file), or send a prepared `Withdrawal` as it is.

        Needs a write token. Returns {"withdrawn": ref, "new": bool, "removed": [digests],
        "epoch": n}; the node syncs it to the fleet. TrustError when the node does not trust
        the signer for that name.
        """
        if isinstance(ref, Withdrawal):
            w = ref
        else:
            if key is None:
                raise TrustError(f"withdrawing {ref} needs the signing key (key=...) of a key trusted for it")
            if isinstance(key, str | os.PathLike):
                from loraflight.engine.keys import load_private

                key = load_private(key)
            name, version = parse_ref(ref)
            w = new_withdrawal(name, version, key, reason=reason)
        return self._action(ACTION_WITHDRAW, payload=w.to_json())

    def withdrawals(self, *, strict: bool = False) -> list[Withdrawal]:
        """The withdrawals the node keeps. A node older than withdrawals answers 'unknown
        action': that is an empty list (or CardError with `strict`). A malformed record is
        the peer's fault (PeerError)."""

        def run() -> list[bytes]:
            return [
                r.body.to_pybytes()
                for r in self._conn.do_action(flight.Action(ACTION_WITHDRAWALS, b""), self._opts())
            ]

        try:
            out = self._call(ACTION_WITHDRAWALS, run)
        except CardError as e:
            if not strict and "unknown action" in str(e):
                return []
            raise
        records = []
        for raw in out[:1_000_000]:
            try:
                records.append(Withdrawal.from_json(raw))
            except CardError as e:
                raise PeerError(f"{self.uri} listed a malformed withdrawal: {e}") from None
        return records

    # -- catalog
    def list(self, criteria: Criteria | None = None, **kw: Any) -> list[CatalogEntry]:
        """The node's catalog (criteria: name glob, base_model, tags, since, limit, digest)."""
        self._ensure_compatible()
        if criteria is None:
            criteria = Criteria.from_kwargs(kw)
        if not criteria.formats and isinstance(self._peer_formats, list):  # a node that knows formats
            criteria = dataclasses.replace(criteria, formats=READ_MAJORS)
        if criteria.header_max is None and self._header_max is not None:  # a node that truncates
            criteria = dataclasses.replace(criteria, header_max=self._header_max)
        blob = criteria.to_json()

        def run() -> list[CatalogEntry]:
            out: list[CatalogEntry] = []
            budget = self.max_list_header_bytes
            for info in list_infos(
                self._conn, blob, self._opts(), f"{self.uri} list", by_action=self._list_action
            ):
                if len(out) >= self.max_entries:
                    raise PeerError(
                        f"{self.uri} lists more than {self.max_entries} cards; refusing the rest "
                        "(raise max_entries if this peer is trusted)"
                    )
                cut = truncated_ref(info)
                entry = entry_from_flight_info(info) if cut is None else self._untruncated(info, cut)
                budget -= len(entry.header_json) or len(bytes(info.app_metadata))
                if budget < 0:
                    raise PeerError(
                        f"{self.uri} lists more than {self.max_list_header_bytes} bytes of card headers; "
                        "refusing the rest (raise max_list_header_bytes if this peer is trusted)"
                    )
                out.append(entry)
            return out

        return list(self._call("list", run))

    def _untruncated(self, info: Any, cut: tuple[str, str, str]) -> CatalogEntry:
        """The whole entry of a listed card whose header came truncated (from get_flight_info)."""
        name, version, digest = cut
        desc = flight.FlightDescriptor.for_path(name, version)
        full = entry_from_flight_info(self._conn.get_flight_info(desc, self._opts()))
        if full.digest != digest:
            raise PeerError(
                f"{self.uri} listed {name}@{version} as {digest[:16]}… but describes {full.digest[:16]}…"
            )
        listed = [
            loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri)
            for ep in info.endpoints
            for loc in ep.locations
        ]
        return full.with_locations([*listed[:64], *full.locations])

    def info(self, name: str, version: int | str = "latest") -> CatalogEntry:
        """The catalog entry of name@version (`latest` resolves on the node)."""
        self._ensure_compatible()
        desc = flight.FlightDescriptor.for_path(name, str(version))
        return entry_from_flight_info(
            self._call("info", lambda: self._conn.get_flight_info(desc, self._opts()))
        )

    # -- fetch
    def fetch(
        self,
        name: str,
        version: int | str = "latest",
        *,
        store: Store | None = None,
        trusted: Iterable[str] | None = None,
        require_signed: bool = False,
        progress: Progress | None = None,
    ) -> LoRACard:
        """Fetch name@version, verified; stored in `store` when given (returned mapped from it)."""
        entry = self.info(name, version)
        return self.fetch_entry(
            entry, store=store, trusted=trusted, require_signed=require_signed, progress=progress
        )

    def fetch_digest(
        self,
        digest: str,
        *,
        store: Store | None = None,
        trusted: Iterable[str] | None = None,
        require_signed: bool = False,
        progress: Progress | None = None,
    ) -> LoRACard:
        entries = self.list(digest=digest)
        if not entries:
            from loraflight.errors import CardNotFound

            raise CardNotFound(f"{self.uri} holds no card with digest {digest[:16]}…")
        return self.fetch_entry(
            entries[0], store=store, trusted=trusted, require_signed=require_signed, progress=progress
        )

    def _peer(self, uri: str, vetted: bool = True) -> Client:
        """A client of another location of a card: TLS if this client uses TLS (whatever the scheme),
        the token only to a `vetted` location, a short `health` first (dead: seconds, once)."""
        if uri == self.uri:
            return self
        if self.tls is not None and uri.startswith("grpc://"):
            uri = "grpc+tls://" + uri[len("grpc://") :]
        key = f"{uri} {vetted}"
        with self._lock:
            c = self._peers.get(key)
        if c is None:
            c = Client(
                uri,
                self.token if vetted else None,
                self.tls,
                min(self.timeout, CONNECT_DEADLINE_S),
                retries=0,
                backoff=self.backoff,
                fetch_timeout=self.fetch_timeout,
                pool=self._pool,
                read_timeout=self.read_timeout,
            )
            try:
                c.health()  # a dead address fails fast here, and is not tried again by this client
                c.timeout, c.retries = self.timeout, self.retries
            except LoraflightError:
                c._unreachable = True
                raise
            finally:
                with self._lock:
                    self._peers[key] = c
        elif c._unreachable:
            raise PeerError(f"{uri} did not answer within {CONNECT_DEADLINE_S:g} s before; not tried again")
        return c

    def fetch_entry(
        self,
        entry: CatalogEntry,
        *,
        store: Store | None = None,
        trusted: Iterable[str] | None = None,
        require_signed: bool = False,
        progress: Progress | None = None,
        locations: Sequence[str] | None = None,
    ) -> LoRACard:
        """Fetch a listed card from any of its locations (this node's own address last)."""
        return self.fetch_entry_stored(
            entry,
            store=store,
            trusted=trusted,
            require_signed=require_signed,
            progress=progress,
            locations=locations,
        )[0]

    def fetch_entry_stored(
        self,
        entry: CatalogEntry,
        *,
        store: Store | None = None,
        trusted: Iterable[str] | None = None,
        require_signed: bool = False,
        progress: Progress | None = None,
        locations: Sequence[str] | None = None,
    ) -> tuple[LoRACard, CatalogEntry | None]:
        """`fetch_entry`, also returning the store's entry of the card (None without a store)."""
        tset = None if trusted is None else set(trusted)
        _check_trust(entry.header, tset, require_signed)
        if store is not None:
            existing = store.check_admission(entry.header)  # conflicts and entry trust before bytes
            if existing is not None:
                return store.get(existing.digest), existing
        # `locations` are the caller's vetted ones; a listing's own are tried without the token
        named = list(locations) if locations else list(entry.locations)
        locs = dedupe([*named, self.uri])[:MAX_LOCATIONS_TRIED]  # in the order given, the lister kept
        if self.uri not in locs:
            locs = [*locs[: MAX_LOCATIONS_TRIED - 1], self.uri]
        errors: list[tuple[str, LoraflightError]] = []
        for loc in locs:
            try:
                peer = self._peer(loc, vetted=bool(locations))
                return peer._fetch_once(entry, store, tset, require_signed, progress, locs)
            except (TrustError, ConflictError, StoreError):
                raise  # the same wherever the bytes come from
            except (CardError, PeerError) as e:
                log.warning("fetch %s from %s failed: %s", entry.ref, loc, e)
                errors.append((loc, e))
            except Exception as e:  # a broken location must not stop failover
                log.warning("fetch %s from %s failed: %s", entry.ref, loc, e)
                errors.append((loc, PeerError(f"{loc}: {e}")))
        card_errors = [e for _, e in errors if isinstance(e, CardError)]
        detail = "; ".join(f"{loc}: {e}" for loc, e in errors)
        if card_errors:
            raise type(card_errors[0])(f"fetching {entry.ref} failed at every location: {detail}")
        raise PeerError(f"fetching {entry.ref} failed at every location: {detail}")

    def get_many(self) -> int:
        """How many cards per bundle this node serves (its `health` says; 0: one do_get per card)."""
        with contextlib.suppress(LoraflightError):
            self._ensure_compatible()
        return self._get_many

    def get_streams(self) -> int:
        """How many do_get streams this node lets one client run at once (its `health`; 0: not said)."""
        with contextlib.suppress(LoraflightError):
            self._ensure_compatible()
        return self._get_streams

    # several listed cards in one stream, stored as one group (the method is client_bundle's)
    fetch_bundle = fetch_bundle

    def _fetch_once(
        self,
        entry: CatalogEntry,
        store: Store | None,
        trusted: set[str] | None,
        require_signed: bool,
        progress: Progress | None,
        known: Sequence[str] = (),
    ) -> tuple[LoRACard, CatalogEntry | None]:
        if entry.size > self.max_card_bytes:
            raise PeerError(
                f"{self.uri} advertises {entry.ref} at {entry.size} bytes, more than this client's limit of "
                f"{self.max_card_bytes}; refused (raise max_card_bytes if such cards are expected)"
            )
        opts = self._opts(timeout=self.fetch_timeout)
        reader = self._call("do_get", lambda: self._data().do_get(flight.Ticket(entry.digest.encode()), opts))
        guard = StallGuard(reader, self.read_timeout, f"{self.uri} do_get {entry.ref}")
        try:
            with guard:
                return self._receive(reader, guard, entry, store, trusted, require_signed, progress, known)
        except BaseException:
            with contextlib.suppress(Exception):
                reader.cancel()
            raise

    def _receive(
        self,
        reader: Any,
        guard: StallGuard,
        entry: CatalogEntry,
        store: Store | None,
        trusted: set[str] | None,
        require_signed: bool,
        progress: Progress | None,
        known: Sequence[str],
    ) -> tuple[LoRACard, CatalogEntry | None]:
        deadline = time.monotonic() + self.fetch_timeout
        schema = guard.read(lambda: self._call("do_get", lambda: reader.schema))
        if store is None:
            card = receive_to_memory(
                self.uri,
                schema,
                entry,
                lambda h: _check_trust(h, trusted, require_signed),
                lambda take, got: self._pump(guard, take, entry, deadline, progress, got),
            )
            return card, None
        with store.stage(
            schema, rows=entry.rows, max_bytes=entry.size, expect_digest=entry.digest, expect=entry
        ) as staged:
            if staged.header is not entry.header:  # else checked on this very header already
                _check_trust(staged.header, trusted, require_signed)
            self._pump(guard, staged.write_batch, entry, deadline, progress, lambda: staged.bytes_received)
            e = staged.commit(source=self.uri, locations=dedupe([self.uri, *entry.locations, *known]))
        card = staged.card if staged.card is not None else store.get(e.digest, touch=False)
        return card, e

    def _pump(
        self,
        guard: StallGuard,
        sink: Callable[[pa.RecordBatch], None],
        entry: CatalogEntry,
        deadline: float,
        progress: Progress | None,
        received: Callable[[], int],
    ) -> None:
        for _ in range(entry.rows + 2):  # a card has at most one batch per row
            try:
                chunk = guard.read(lambda: self._call("do_get", guard.reader.read_chunk))
            except StopIteration:
                return
            if chunk.data is not None:
                sink(chunk.data)
            if progress is not None:
                progress(received(), entry.size)
            if time.monotonic() > deadline:
                raise PeerError(
                    f"{self.uri}: transfer of {entry.ref} exceeded its {self.fetch_timeout:.0f} s deadline"
                )
        raise CardError(f"{self.uri} sent more batches for {entry.ref} than it has rows ({entry.rows})")

    # -- publish
    def publish(
        self, card_or_path: LoRACard | str | os.PathLike[str], *, progress: Progress | None = None
    ) -> str:
        """Upload a card (needs a write token); returns its digest as the node stored it.

        `progress(bytes_sent, bytes_total)` is called after each record batch is written."""
        self._ensure_compatible()
        card = card_or_path if isinstance(card_or_path, LoRACard) else LoRACard.open(card_or_path)
        cmd = json.dumps({"op": PUBLISH_OP, "rows": len(card), "name": card.name, "version": card.version})
        desc = flight.FlightDescriptor.for_command(cmd.encode())
        schema = card.schema

        def run() -> bytes:
            writer, meta = self._data().do_put(desc, schema, self._opts(timeout=self.fetch_timeout))
            batches = card.batches
            total, sent = sum(b.nbytes for b in batches), 0
            try:
                for b in batches:
                    writer.write_batch(pa.record_batch(b.columns, schema=schema))
                    sent += b.nbytes
                    if progress is not None:
                        progress(sent, total)
                writer.done_writing()
                buf = meta.read()
            finally:
                writer.close()
            return b"" if buf is None else buf.to_pybytes()

        answer = self._call("publish", run)
        try:
            digest = json.loads(answer)["digest"]
        except (ValueError, KeyError, TypeError):
            raise PeerError(f"{self.uri} answered publish without a digest") from None
        if digest != card.digest:
            raise PeerError(
                f"{self.uri} stored digest {digest[:16]}… for a card of digest {card.digest[:16]}…"
            )
        return str(digest)


def _check_trust(header: CardHeader, trusted: set[str] | None, require_signed: bool) -> None:
    """The caller's own trust demands, checked on the header before any byte is stored."""
    verify_signature(header, trusted, require_signed=require_signed)


__all__ = ["Client", "Progress", "node_action"]
