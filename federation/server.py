"""The Flight server of a node: lists, serves and accepts cards (docs/protocol.md).

Every handler runs through `edge`, so only `flight.Flight*Error`s leave it, each with a
`[lf:code]` message and no traceback; unexpected exceptions are logged here in full.
`do_get` streams the mapped card file's record batches without copying them into Python.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.flight as flight

from loraflight.engine.card import (
    FORMAT_VERSION,
    MAX_ROWS,
    METADATA_KEY,
    READ_MAJORS,
    LoRACard,
    card_schema,
    check_name,
)
from loraflight.errors import BusyError, CardError, ConfigError, LoraflightError, StoreError

from .identity import NodeIdentity
from .limits import (
    CLIENT_MIDDLEWARE,
    ClientKeyFactory,
    Slot,
    StreamSlots,
    TickingReader,
    call_client_key,
    watched,
)
from .pause import pause_point
from .protocol import (
    ACTION_DELETE,
    ACTION_HAVE,
    ACTION_HEALTH,
    ACTION_HELLO,
    ACTION_LIST,
    ACTION_NODE_INFO,
    ACTION_NOTIFY,
    ACTION_WITHDRAW,
    ACTION_WITHDRAWALS,
    ACTIONS,
    GET_MANY_KEY,
    GET_STREAMS_KEY,
    LIST_ACTION_KEY,
    LISTING_HEADER_BYTES,
    LISTING_HEADER_KEY,
    MAX_BUNDLE_CARDS,
    MAX_CARD_BYTES,
    PROTOCOL_VERSION,
    PUBLISH_OP,
    CatalogEntry,
    bundle_schema,
    check_version,
    descriptor_ref,
    entry_to_flight_info,
    offer_filter,
    parse_bundle_ticket,
    parse_criteria,
    parse_json_body,
    parse_ticket,
    software_version,
    to_flight_error,
)
from .ratelimit import SummaryLog
from .security import AuthMiddlewareFactory, ServerTLS, call_source, load_tokens, require_write
from .serve_bundle import bundle_batches
from .store import Store
from .swarm.service import SwarmLimits, SwarmService
from .swarm.wire import PIECES_KEY, HaveItem, parse_piece_ticket
from .withdrawal import Withdrawal

log = logging.getLogger(__name__)
_quiet = SummaryLog(log)  # refusals and failures: one line per kind and interval
F = TypeVar("F", bound=Callable[..., Any])
MAP_CACHE = 256  # open card maps kept for do_get (address space only; pages are the page cache's)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds against hostile or overloaded peers."""

    max_card_bytes: int = MAX_CARD_BYTES  # largest card accepted by do_put
    # do_get streams at once: each holds about one batch (≤ 4 MiB) in gRPC's send buffers, so
    # this bounds the server's memory; callers beyond it wait up to get_wait_s, then get 'busy'.
    max_concurrent_gets: int = 4
    get_wait_s: float = 30.0
    max_list_entries: int = 100_000  # FlightInfos in one list_flights answer
    put_deadline_s: float = 900.0  # a do_put must finish within this
    stop_timeout_s: float = 10.0  # shutdown waits this long for calls in flight
    # (federation/limits.py) a stream that makes no progress this long gives its slot back
    stall_s: float = 30.0
    gets_per_client: int = 3  # do_get streams one client (token, else address) runs at once
    max_concurrent_puts: int = 8  # do_put and do_exchange streams at once (each kind)
    puts_per_client: int = 2
    put_idle_s: float = 60.0  # a do_put/do_exchange stream idle this long gives its slot back
    listing_header_bytes: int = LISTING_HEADER_BYTES  # header bytes per listing entry (larger: truncated)


def normalize_uri(addr: str, tls: bool = False) -> str:
    """'host:port' -> 'grpc://host:port' ('grpc+tls://' with TLS); URIs are checked and kept."""
    if "://" not in addr:
        addr = f"{'grpc+tls' if tls else 'grpc'}://{addr}"
    u = urlsplit(addr)
    if u.scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not u.hostname:
        raise ConfigError(f"{addr!r} is not a Flight address: use HOST:PORT or grpc[+tls]://HOST:PORT")
    try:
        u.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ConfigError(f"{addr!r} has an invalid port") from None
    if u.port is None:
        raise ConfigError(f"{addr!r} has no port: use HOST:PORT")
    return addr


def edge(fn: F) -> F:
    """Translate everything a handler raises into a Flight error with a clear message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except flight.FlightError:
            raise
        except LoraflightError as e:
            # one line per kind of refusal and interval, however many arrive (a flood)
            _quiet.log(logging.WARNING, f"{fn.__name__}:{type(e).__name__}", "%s refused: %s", fn.__name__, e)
            raise to_flight_error(e, flight) from None
        except Exception as e:
            if _quiet.log(logging.ERROR, f"{fn.__name__}:failed", "%s failed: %r", fn.__name__, e):
                log.error("traceback of the failure above", exc_info=True)
            raise to_flight_error(e, flight) from None

    return wrapper  # type: ignore[return-value]


def _neutral_get_schema() -> Callable[[Any, Any, Any], Any]:
    ns: dict[str, Any] = {}
    src = (
        "def get_schema(self, context, descriptor):\n"
        "    r = self.schema_or_error(descriptor)\n"
        "    if isinstance(r, Exception):\n"
        "        raise r\n"
        "    return r\n"
    )
    exec(compile(src, "<loraflight>", "exec"), ns)  # fixed source, no data in it
    return ns["get_schema"]  # type: ignore[no-any-return]


class CardServer(flight.FlightServerBase):
    """A node's Flight service over a `Store` (see module doc and docs/protocol.md)."""

    def __init__(
        self,
        store: Store,
        *,
        listen: str = "grpc://127.0.0.1:0",
        advertise: Sequence[str] | None = None,
        tls: ServerTLS | None = None,
        write_tokens: Sequence[str] = (),
        read_tokens: Sequence[str] = (),
        node_id: str = "",
        fleet_id: str = "default",
        limits: Limits | None = None,
        on_notify: Callable[[str], None] | None = None,
        peer_locations: Callable[[str], list[str]] | None = None,
        exchange: Callable[[Any, Any, Any, Any], None] | None = None,
        on_notify_from: Callable[[str, str], None] | None = None,
        on_hello: Callable[[dict[str, Any], str], dict[str, Any]] | None = None,
        swarm_limits: SwarmLimits | None = None,
    ) -> None:
        uri = normalize_uri(listen, tls is not None)
        u = urlsplit(uri)
        if tls is not None and u.scheme != "grpc+tls":
            uri = f"grpc+tls://{u.netloc}"
        if tls is None and u.scheme == "grpc+tls":
            raise ConfigError(f"{listen} asks for TLS, but no certificate and key were given")
        kwargs: dict[str, Any] = {}
        if tls is not None:
            kwargs["tls_certificates"] = [(tls.cert, tls.key)]
            if tls.client_ca is not None:
                kwargs["verify_client"] = True
                kwargs["root_certificates"] = tls.client_ca
        self.store = store
        self.skipped_offers: collections.Counter[str] = collections.Counter()
        self._skip_lock = threading.Lock()
        self.node_id = node_id
        self.fleet_id = fleet_id
        self.limits = limits or Limits()
        self.tls = tls is not None
        self._on_notify = on_notify
        # (peer, source) and (body, source): source is `security.call_source` (rate limits)
        self._on_notify_from = on_notify_from
        self._on_hello = on_hello
        self._peer_locations = peer_locations
        self._exchange = exchange  # do_exchange handler (serving.make_exchange_handler), or None
        self._write_tokens = tuple(write_tokens)
        lim = self.limits
        self._gets = StreamSlots(
            "do_get",
            total=lim.max_concurrent_gets,
            per_client=lim.gets_per_client,
            idle_s=lim.stall_s,
            wait_s=lim.get_wait_s,
        )
        self._puts = StreamSlots(
            "do_put", total=lim.max_concurrent_puts, per_client=lim.puts_per_client, idle_s=lim.put_idle_s
        )
        self._exchanges = StreamSlots(
            "do_exchange",
            total=lim.max_concurrent_puts,
            per_client=lim.puts_per_client,
            idle_s=lim.put_idle_s,
        )
        self._cache: collections.OrderedDict[str, LoRACard] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._stopped = False
        self._stop_lock = threading.Lock()
        # the piece swarm: partial cards served while fetched, who holds what (federation/swarm)
        self.swarm = SwarmService(store, swarm_limits)
        self.swarm.self_uris = lambda: self.locations
        try:
            super().__init__(
                uri,
                middleware={
                    "auth": AuthMiddlewareFactory(read_tokens, write_tokens),
                    CLIENT_MIDDLEWARE: ClientKeyFactory(),
                },
                **kwargs,
            )
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"cannot listen on {uri}: {e}") from None
        scheme = "grpc+tls" if self.tls else "grpc"
        host = u.hostname or "127.0.0.1"
        if advertise:
            locs = []
            for a in advertise:
                au = urlsplit(normalize_uri(a, self.tls))
                port = au.port or self.port
                locs.append(f"{scheme}://{_host(au.hostname or host)}:{port if port else self.port}")
            self._locations = locs
        else:
            if host in ("0.0.0.0", "::", ""):
                log.warning(
                    "listening on %s without --advertise: peers are told 127.0.0.1, which other hosts "
                    "cannot reach; pass the address other hosts should use",
                    host,
                )
                host = "127.0.0.1"
            self._locations = [f"{scheme}://{_host(host)}:{self.port}"]
        log.info("serving cards on %s (advertised %s)", uri, ", ".join(self._locations))

    # -- lifecycle
    @property
    def locations(self) -> list[str]:
        """The addresses this node advertises (other hosts connect to these)."""
        return list(self._locations)

    @property
    def location(self) -> str:
        return self._locations[0]

    def use_locations(self, locations: list[str]) -> None:
        """Addresses to advertise, once the bound port is known (listen on port 0)."""
        if locations:
            self._locations = list(locations)

    def start(self) -> CardServer:
        """The server accepts calls from construction on; kept for symmetry with `stop`."""
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Shut down from a helper thread with a deadline (a stalled client cannot hold us)."""
        with self._stop_lock:
            if self._stopped:
                return True
            self._stopped = True
        for pool in (self._gets, self._puts, self._exchanges):
            pool.close()
        self.swarm.close()
        t = threading.Thread(target=self.shutdown, name="loraflight-flight-shutdown", daemon=True)
        t.start()
        t.join(self.limits.stop_timeout_s if timeout is None else timeout)
        if t.is_alive():
            log.warning("Flight shutdown did not finish in time; calls still in flight are abandoned")
            return False
        return True

    def __enter__(self) -> CardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stream_counts(self) -> dict[str, dict[str, int]]:
        """Streams per kind: active (holding a slot), open (stalled ones included), stalled so far."""
        return {p.what: p.counts() for p in (self._gets, self._puts, self._exchanges)}

    # -- helpers
    def _entry_locations(self, entry: CatalogEntry) -> CatalogEntry:
        extra: list[str] = []
        if self._peer_locations is not None:
            try:
                extra = list(self._peer_locations(entry.digest))
            except Exception:
                log.exception("peer_locations callback failed")
        return entry.with_locations([*self._locations, *extra, *entry.locations])

    def node_info(self) -> dict[str, Any]:
        st = self.store.stats()
        return {
            "node_id": self.node_id,
            "fleet_id": self.fleet_id,
            "software": software_version(),
            "protocol": PROTOCOL_VERSION,
            "format": FORMAT_VERSION,
            "formats": list(READ_MAJORS),  # the card format majors this node reads
            GET_MANY_KEY: MAX_BUNDLE_CARDS,  # serves several cards per do_get (bundle tickets)
            PIECES_KEY: 1,  # serves piece tickets (the swarm)
            "swarm": self.swarm.status(),
            "skipped_offers": dict(self.skipped_offers),  # cards not listed to a peer, by reason
            "streams": self.stream_counts(),
            "epoch": self.store.epoch,
            "cards": st["cards"],
            "bytes": st["bytes"],
            "pinned": st["pinned"],
            "published": st["published"],
            "locations": self.locations,
            "tls": self.tls,
            "trust": self.store.trust_mode,
            "writable": bool(self._write_tokens),
        }

    # -- catalog
    @edge
    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        return self._catalog(context, criteria)

    def _catalog(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        """The listing (list_flights, and the `list` action for nodes that advertise it)."""
        c = parse_criteria(criteria)
        limit = min(c.limit or self.limits.max_list_entries, self.limits.max_list_entries)
        entries = self.store.list(dataclasses.replace(c, limit=limit))
        # No peer is offered a card it cannot read. A loraflight node that sends no formats is an
        # older one (format 1 only); a generic Flight client (no loraflight-protocol header) reads
        # Arrow, not cards, and is offered everything.
        mw = context.get_middleware("auth") if context is not None else None
        older_node = mw is not None and mw.peer_protocol is not None
        entries, skipped = offer_filter(entries, c.formats or ((1,) if older_node else READ_MAJORS))
        if skipped:
            with self._skip_lock:
                self.skipped_offers.update(skipped)
        # Streamed: one FlightInfo is built as gRPC asks for the next, so a listing of large
        # headers never sits in memory whole. An asker that says how much header it takes per
        # entry (criteria header_max) gets larger headers as a truncation marker instead.
        cap = None if c.header_max is None else min(c.header_max, self.limits.listing_header_bytes)
        return (
            entry_to_flight_info(
                self._entry_locations(e),
                flight,
                self.swarm.listing_holders(e.digest, len(e.header.pieces)) if e.header.pieces else None,
                header_max=cap,
            )
            for e in entries
        )

    def _resolve(self, descriptor: flight.FlightDescriptor) -> CatalogEntry:
        if descriptor.descriptor_type != flight.DescriptorType.PATH:
            raise CardError("use a path descriptor [name, version|'latest']")
        name, version = descriptor_ref(list(descriptor.path))
        return self.store.find(name, version)

    @edge
    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        return entry_to_flight_info(self._entry_locations(self._resolve(descriptor)), flight)

    def schema_or_error(self, descriptor: flight.FlightDescriptor) -> flight.SchemaResult | Exception:
        """get_schema's answer, or the Flight error to raise (returned, never raised here)."""
        try:
            e = self._resolve(descriptor)
            raw = e.header_json or e.header.to_json()
            return flight.SchemaResult(card_schema(e.header.dtype, {METADATA_KEY: raw}))
        except LoraflightError as err:
            log.warning("get_schema refused: %s", err)
            return to_flight_error(err, flight)
        except Exception as err:
            log.exception("get_schema failed")
            return to_flight_error(err, flight)

    # pyarrow's get_schema does not map a raised FlightError onto its status (unlike every other
    # handler) but sends the Python traceback along: the error is raised from a frame compiled
    # under a neutral name, so the client sees no server path or source line (docs/decisions).
    get_schema = _neutral_get_schema()

    # -- transfer
    def _mapped(self, digest: str) -> LoRACard:
        """The mapped card, from a small cache of open maps (checked against the index each call)."""
        if self.store.entry_exists(digest):
            with self._cache_lock:
                card = self._cache.get(digest)
                if card is not None:
                    self._cache.move_to_end(digest)
            if card is not None:
                self.store.touch(digest)
                return card
        card = self.store.get(digest)  # CardNotFound if absent
        with self._cache_lock:
            self._cache[digest] = card
            while len(self._cache) > MAP_CACHE:
                self._cache.popitem(last=False)
        return card

    @edge
    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.FlightDataStream:
        many = parse_bundle_ticket(ticket.ticket)
        if many is not None:
            slot = self._gets.acquire(call_client_key(context))
            return flight.GeneratorStream(bundle_schema(), watched(bundle_batches(self.store, many), slot))
        pieces = parse_piece_ticket(ticket.ticket)
        if pieces is not None:
            peer = str(context.peer() if context is not None else "").rsplit(":", 1)[0]
            slot = self._gets.acquire(call_client_key(context))
            try:
                schema, stream = self.swarm.serve(pieces, peer, self._mapped)
            except BusyError as e:  # routine in a swarm (the asker goes elsewhere): not logged
                slot.release()
                raise to_flight_error(e, flight) from None
            except BaseException:
                slot.release()
                raise
            return flight.GeneratorStream(schema, watched(stream, slot))
        digest = parse_ticket(ticket.ticket)
        card = self._mapped(digest)
        slot = self._gets.acquire(call_client_key(context))
        schema = card.batches[0].schema
        batches = card.batches

        def card_stream() -> Iterator[pa.RecordBatch]:
            for i, b in enumerate(batches):
                yield b
                pause_point("serve_batches", i + 1)

        return flight.GeneratorStream(schema, watched(card_stream(), slot))

    @edge
    def do_put(
        self,
        context: Any,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        require_write(context, "publishing a card (do_put)", bool(self._write_tokens))
        rows: int | None = None
        if descriptor.descriptor_type == flight.DescriptorType.CMD:
            cmd = parse_json_body(descriptor.command, "do_put command")
            if cmd.get("op") != PUBLISH_OP:
                raise CardError(
                    f"unknown do_put command {str(cmd.get('op'))[:64]!r}; expected {PUBLISH_OP!r}"
                )
            r = cmd.get("rows")
            if r is not None:
                if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_ROWS:
                    raise CardError(
                        f"do_put 'rows' must be an integer from 1 to {MAX_ROWS} (a card's most modules)"
                    )
                rows = r
        slot = self._puts.acquire(call_client_key(context))
        try:
            self._put(reader, writer, rows, slot)
        finally:
            slot.release()

    def _chunks(self, reader: Any, slot: Slot, deadline: float) -> Iterator[Any]:
        """The chunks of a do_put stream, bounded by the put deadline and the idle watchdog."""
        for _ in range(10_000_000):
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            slot.check()
            slot.progress()
            if time.monotonic() > deadline:
                raise CardError(f"publish took longer than {self.limits.put_deadline_s:.0f} s; refused")
            yield chunk
        raise CardError("publish sent more than 10,000,000 messages; refused")

    def _put(self, reader: Any, writer: Any, rows: int | None, slot: Slot) -> None:
        deadline = time.monotonic() + self.limits.put_deadline_s
        with self.store.stage(reader.schema, rows=rows, max_bytes=self.limits.max_card_bytes) as staged:
            # trust policy and name@version conflicts are refused before any tensor byte is read
            existing = self.store.check_admission(staged.header)
            if existing is not None:  # already held: publishing again is a no-op
                self.store.set_published(existing.digest)
                for _chunk in self._chunks(reader, slot, deadline):  # drain, storing nothing
                    pass
                writer.write(
                    pa.py_buffer(json.dumps({"digest": existing.digest, "ref": existing.ref}).encode())
                )
                return
            for chunk in self._chunks(reader, slot, deadline):
                if chunk.data is not None:
                    staged.write_batch(chunk.data)
            entry = staged.commit(source="local", published=True)
        writer.write(pa.py_buffer(json.dumps({"digest": entry.digest, "ref": entry.ref}).encode()))

    @edge
    def do_exchange(
        self,
        context: Any,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        if self._exchange is None:
            raise ConfigError(
                "this node does not serve embeddings (do_exchange): it runs no engine; "
                "start it with engine.base_model set"
            )
        slot = self._exchanges.acquire(call_client_key(context))
        try:
            self._exchange(context, descriptor, TickingReader(reader, slot), writer)
        finally:
            slot.release()

    # -- actions
    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return list(ACTIONS.items())

    @edge
    def do_action(self, context: Any, action: flight.Action) -> Iterator[bytes]:
        kind = action.type
        if kind == ACTION_HEALTH:
            body = {
                "status": "ok",
                "node_id": self.node_id,
                "fleet_id": self.fleet_id,
                "protocol": PROTOCOL_VERSION,
                "formats": list(READ_MAJORS),
                GET_MANY_KEY: MAX_BUNDLE_CARDS,
                GET_STREAMS_KEY: self.limits.gets_per_client,
                LISTING_HEADER_KEY: self.limits.listing_header_bytes,
                LIST_ACTION_KEY: 1,
                PIECES_KEY: 1,
                "epoch": self.store.epoch,
            }
        elif kind == ACTION_LIST:  # the catalog of list_flights, as an action stream (protocol.py)
            infos = self._catalog(context, action.body.to_pybytes() if action.body else b"")
            return (info.serialize() for info in infos)
        elif kind == ACTION_NODE_INFO:
            body = self.node_info()
        elif kind == ACTION_NOTIFY:
            req = parse_json_body(action.body.to_pybytes() if action.body else b"", "notify")
            peer = req.get("peer")
            if not isinstance(peer, str) or "://" not in peer or len(peer) > 512:
                raise CardError('notify body must be {"peer": "grpc://host:port", "epoch": n}')
            normalize_uri(peer)
            try:
                if self._on_notify_from is not None:
                    self._on_notify_from(peer, call_source(context))
                elif self._on_notify is not None:
                    self._on_notify(peer)
            except Exception:
                log.exception("on_notify callback failed for %s", peer)
            body = {"ok": True, "epoch": self.store.epoch}
        elif kind == ACTION_HELLO and self._on_hello is not None:  # fleet secret: federation.fleet_auth
            req = parse_json_body(action.body.to_pybytes() if action.body else b"", "hello")
            body = self._on_hello(req, call_source(context))
        elif kind == ACTION_HAVE:
            item = HaveItem.from_dict(
                parse_json_body(action.body.to_pybytes() if action.body else b"", "have")
            )
            self.swarm.note_have(item)
            body = {"ok": True}
        elif kind == ACTION_DELETE:
            require_write(context, "deleting a card", bool(self._write_tokens))
            req = parse_json_body(action.body.to_pybytes() if action.body else b"", "delete")
            digest = req.get("digest")
            if not isinstance(digest, str):
                name, version = req.get("name"), req.get("version", "latest")
                if not isinstance(name, str):
                    raise CardError('delete body must be {"digest": hex} or {"name": n, "version": v}')
                digest = self.store.find(check_name(name), check_version(version)).digest
            entry = self.store.remove(digest)
            body = {"removed": entry.digest, "ref": entry.ref, "epoch": self.store.epoch}
        elif kind == ACTION_WITHDRAW:
            require_write(context, "withdrawing a card", bool(self._write_tokens))
            w = Withdrawal.from_json(action.body.to_pybytes() if action.body else b"{}")
            body = {**self.store.withdraw(w).to_dict(), "epoch": self.store.epoch}
        elif kind == ACTION_WITHDRAWALS:
            return iter([w.to_json() for w in self.store.withdrawals()])
        else:
            raise CardError(f"unknown action {kind[:64]!r}; known: {', '.join(ACTIONS)}")
        return iter([json.dumps(body).encode()])


def _host(h: str) -> str:
    return f"[{h}]" if ":" in h and not h.startswith("[") else h


def run_server(
    store_dir: str | os.PathLike[str],
    *,
    listen: str = "127.0.0.1:0",
    advertise: Sequence[str] | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    token_file: str | None = None,
    read_token_file: str | None = None,
    trust: str = "open",
    max_bytes: int | None = None,
    fleet_id: str = "default",
    on_ready: Callable[[CardServer], None] | None = None,
    stop_event: threading.Event | None = None,
) -> int:
    """Build Store + identity + CardServer and serve until SIGTERM/SIGINT; returns 0 after a clean stop."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is on top of TLS)")
    tls = ServerTLS.from_files(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None
    writes = load_tokens(token_file)
    reads = load_tokens(read_token_file)
    if writes and tls is None:
        log.warning("write tokens without TLS travel in clear text; configure --tls-cert/--tls-key")
    root = Path(store_dir)
    identity = NodeIdentity.load_or_create(root / "identity")
    stop = stop_event or threading.Event()
    store = Store(root, max_bytes=max_bytes, trust=trust)
    try:
        server = CardServer(
            store,
            listen=listen,
            advertise=advertise,
            tls=tls,
            write_tokens=writes,
            read_tokens=reads,
            node_id=identity.node_id,
            fleet_id=fleet_id,
        )
        old: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            if on_ready is not None:
                on_ready(server)
            while not stop.wait(3600.0):  # woken by a signal or the caller's event
                pass
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            server.stop()
    except OSError as e:
        if isinstance(e, LoraflightError):
            raise
        raise StoreError(f"server failed: {e}") from None
    finally:
        with contextlib.suppress(Exception):
            store.close()
    return 0


__all__ = ["CardServer", "Limits", "edge", "normalize_uri", "run_server"]
