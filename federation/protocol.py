"""The loraflight wire protocol over Arrow Flight: versions, action names, criteria, catalog
entries and the error mapping (docs/protocol.md). Pure: no sockets, no files.

Theory of operation
-------------------
A card travels as a Flight stream whose schema metadata carries the card header. The
catalog is `list_flights`: one `FlightInfo` per card with the header JSON in
`app_metadata`, descriptor path `[name, version]`, and one endpoint whose ticket is the
digest and whose locations are every known holder of that digest. Every call carries the
client's protocol version in the `loraflight-protocol` header; a server refuses another
major. Errors cross the wire as Flight errors whose message starts with `[lf:<code>]`, so
a client maps them back onto the `LoraflightError` hierarchy.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from loraflight.engine.card import MAX_ROWS, METADATA_KEY, CardHeader, card_schema, check_digest, check_name
from loraflight.errors import (
    AuthError,
    BusyError,
    CardError,
    CardNotFound,
    ConfigError,
    ConflictError,
    LoraflightError,
    PeerError,
    StoreError,
    TrustError,
)

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
PROTOCOL_HEADER = "loraflight-protocol"  # gRPC metadata keys are lower case

ACTION_HEALTH = "health"
ACTION_NODE_INFO = "node-info"
ACTION_NOTIFY = "notify"
ACTION_DELETE = "delete"
ACTION_WITHDRAW = "withdraw"
ACTION_WITHDRAWALS = "withdrawals"
ACTION_HELLO = "hello"
ACTION_HAVE = "have"  # the swarm: which pieces of a card the sender holds (federation/swarm/wire.py)
ACTION_LIST = "list"  # the catalog as a DoAction stream (see LIST_ACTION_KEY)
ACTIONS: dict[str, str] = {
    ACTION_HEALTH: "liveness: status, node id, protocol version, catalog epoch",
    ACTION_NODE_INFO: "node id, fleet id, software, protocol and format versions, epoch, counts, bytes",
    ACTION_NOTIFY: 'a peer\'s catalog changed; body JSON {"peer": uri, "epoch": n} (sync from it now)',
    ACTION_DELETE: 'remove a card; body JSON {"digest": hex} or {"name": n, "version": v}; needs a write token',
    ACTION_WITHDRAW: "honour and keep a signed withdrawal; body: the record's JSON; needs a write token",
    ACTION_WITHDRAWALS: "every withdrawal this node keeps: one result per record (JSON)",
    ACTION_HELLO: "fleet-secret challenge both ways (HMAC over fresh nonces); body JSON, see docs/protocol.md",
    ACTION_HAVE: 'which pieces of a card a peer holds; body JSON {"digest", "peer", "pieces", "count"}',
    ACTION_LIST: "the catalog, as list_flights gives it: body the criteria; one serialized FlightInfo per result",
}
# A node that serves listings as the `list` action says so in `health`: {"list_action": 1}.
# Its clients list that way; others get list_flights. pyarrow's client turns a listing that the
# server cancels mid-stream (a node stopping) into a simulated SIGINT when it comes through
# list_flights (its SignalStopHandler), which stops the main thread of whatever program lists,
# from any thread; an action stream ends with a plain error instead.
LIST_ACTION_KEY = "list_action"
PUBLISH_OP = "publish"
MAX_CRITERIA_BYTES = 64 * 1024
MAX_ACTION_BODY = 64 * 1024


def software_version() -> str:
    from loraflight import __version__

    return __version__


def parse_version(text: str) -> tuple[int, int]:
    m = re.match(r"^([0-9]{1,9})\.([0-9]{1,9})$", text.strip()) if isinstance(text, str) else None
    if not m:
        shown = text[:40] + "…" if isinstance(text, str) and len(text) > 40 else text
        raise PeerError(
            f"peer sent protocol version {shown!r}, which is not 'major.minor' (at most 9 digits each)"
        )
    return int(m.group(1)), int(m.group(2))


def check_protocol(text: str | None, who: str = "peer") -> None:
    """Refuse another major version with a message saying so; minors interoperate."""
    if text is None:
        return  # a generic Flight client: served, it knows nothing of versions
    major, _ = parse_version(text)
    if major != PROTOCOL_MAJOR:
        raise PeerError(
            f"{who} speaks loraflight protocol {text}, this node speaks {PROTOCOL_VERSION}: "
            f"major versions differ ({major} vs {PROTOCOL_MAJOR}); upgrade the older side"
        )


# --------------------------------------------------------------------------- criteria


@dataclasses.dataclass(frozen=True)
class Criteria:
    """What a `list_flights` asks for; empty = every card."""

    name: str | None = None  # glob over card names
    base_model: str | None = None
    tags: tuple[str, ...] = ()  # every tag must be present
    since: int | None = None  # only cards added after this catalog epoch
    limit: int | None = None
    digest: str | None = None  # exactly this card
    formats: tuple[int, ...] = ()  # the card format majors the asker reads (absent: an older node, 1 only)
    header_max: int | None = None  # header bytes the asker takes per entry; larger ones come truncated

    @classmethod
    def from_kwargs(cls, kw: Mapping[str, Any]) -> Criteria:
        """Criteria from keyword arguments (tags may be any iterable; None values ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - known)
        if bad:
            raise CardError(f"unknown criteria {bad}; known: {', '.join(sorted(known))}")
        args: dict[str, Any] = {k: v for k, v in kw.items() if v is not None}
        if "tags" in args:
            tags = args["tags"]
            args["tags"] = (tags,) if isinstance(tags, str) else tuple(tags)
        return cls(**args)

    def to_json(self) -> bytes:
        d: dict[str, Any] = {}
        if self.name is not None:
            d["name"] = self.name
        if self.base_model is not None:
            d["base_model"] = self.base_model
        if self.tags:
            d["tags"] = list(self.tags)
        if self.since is not None:
            d["since"] = self.since
        if self.limit is not None:
            d["limit"] = self.limit
        if self.digest is not None:
            d["digest"] = self.digest
        if self.formats:
            d["formats"] = list(self.formats)
        if self.header_max is not None:
            d["header_max"] = self.header_max
        return json.dumps(d, sort_keys=True).encode() if d else b""

    def matches(self, header: CardHeader) -> bool:
        if self.name is not None and not fnmatch.fnmatchcase(header.name, self.name):
            return False
        if self.digest is not None and header.digest != self.digest:
            return False
        if self.base_model is not None and header.base_model != self.base_model:
            return False
        return all(t in header.tags for t in self.tags)


def parse_criteria(data: bytes | None) -> Criteria:
    """Parse criteria JSON; every problem reported together as a CardError."""
    if not data:
        return Criteria()
    if len(data) > MAX_CRITERIA_BYTES:
        raise CardError(f"criteria are {len(data)} bytes; the limit is {MAX_CRITERIA_BYTES}")
    try:
        raw = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also absurd integers
        raise CardError(f"criteria are not UTF-8 JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CardError("criteria must be a JSON object with keys name, base_model, tags, since, limit")
    problems = []
    keys = ("name", "base_model", "tags", "since", "limit", "digest", "formats", "header_max")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        shown = [str(k)[:64] for k in unknown[:8]]
        problems.append(f"unknown criteria keys {shown} (known: {', '.join(keys)})")
    name, base, tags, since, limit, digest, formats, header_max = (raw.get(k) for k in keys)
    if formats is None:
        formats = []
    if (
        not isinstance(formats, list)
        or len(formats) > 16
        or not all(isinstance(f, int) and not isinstance(f, bool) and 1 <= f <= 1000 for f in formats)
    ):
        problems.append("'formats' must be a list of at most 16 format majors (positive integers)")
        formats = []
    if digest is not None and (not isinstance(digest, str) or not re.match(r"^[0-9a-f]{64}$", digest)):
        problems.append("'digest' must be 64 lowercase hex characters")
    if name is not None and (not isinstance(name, str) or len(name) > 256):
        problems.append("'name' must be a glob string of at most 256 characters")
    if base is not None and (not isinstance(base, str) or len(base) > 1024):
        problems.append("'base_model' must be a string")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or len(tags) > 64 or not all(isinstance(t, str) for t in tags):
        problems.append("'tags' must be a list of at most 64 strings")
        tags = []
    for key, v in (("since", since), ("limit", limit), ("header_max", header_max)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63):
            problems.append(f"{key!r} must be an integer from 0 to 2**63-1")
    if problems:
        raise CardError("invalid criteria: " + "; ".join(problems))
    return Criteria(
        name=name,
        base_model=base,
        tags=tuple(tags),
        since=since,
        limit=limit,
        digest=digest,
        formats=tuple(formats),
        header_max=header_max,
    )


# --------------------------------------------------------------------------- catalog entries


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One card as a catalog lists it: header, size, rows, and every known location."""

    header: CardHeader
    size: int  # bytes of the card file (an upper bound of the streamed body)
    rows: int
    locations: tuple[str, ...] = ()
    source: str = ""
    pinned: bool = False
    published: bool = False
    epoch: int = 0  # the catalog epoch at which it was added (on the listing node)
    # The exact bytes `header` was parsed from (listing app_metadata or the index), when known:
    # a receiver whose stream carries the same bytes reuses `header` instead of parsing again.
    header_json: bytes = dataclasses.field(default=b"", compare=False, repr=False)
    # Partial holders the listing node knows of, (uri, bitfield) pairs (the swarm; docs/protocol.md)
    holders: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def digest(self) -> str:
        return self.header.digest

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def ref(self) -> str:
        return self.header.ref

    def with_locations(self, locations: Iterable[str]) -> CatalogEntry:
        return dataclasses.replace(self, locations=tuple(dedupe(locations)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "size": self.size,
            "rows": self.rows,
            "base_model": self.header.base_model,
            "tags": list(self.header.tags),
            "signer": self.header.signer,
            "locations": list(self.locations),
            "header": self.header.to_dict(),
        }


def offer_filter(
    entries: Iterable[CatalogEntry], reads: Iterable[int]
) -> tuple[list[CatalogEntry], dict[str, int]]:
    """The entries a peer reading format majors `reads` may be offered, and what was left out
    (count per reason). A peer that names no formats is an older node: it reads major 1."""
    ok = set(reads)
    out: list[CatalogEntry] = []
    skipped: dict[str, int] = {}
    for e in entries:
        if e.header.major in ok:
            out.append(e)
        else:
            why = f"format {e.header.major} card, the peer reads {', '.join(map(str, sorted(ok)))}"
            skipped[why] = skipped.get(why, 0) + 1
    return out, skipped


def dedupe(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for x in items:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


# A listing entry carries at most this many bytes of header when the asker says it takes
# truncated entries (criteria "header_max"; a node says it truncates in `health`). A larger
# header travels as a truncation marker; `get_flight_info` and `get_schema` give it whole.
LISTING_HEADER_BYTES = 16 * 1024
LISTING_HEADER_KEY = "listing_header_max"
TRUNCATED_KEY = "loraflight_truncated"


def entry_to_flight_info(
    entry: CatalogEntry,
    flight: Any,
    holders: Mapping[str, str] | None = None,
    *,
    header_max: int | None = None,
) -> Any:
    """A FlightInfo for `entry` (`flight` is pyarrow.flight, passed to keep imports light);
    `holders` (uri -> bitfield: partial holders) go in the endpoint's app_metadata. With
    `header_max`, a header larger than that goes as a truncation marker (`truncated_ref`)."""
    header_json = entry.header_json or entry.header.to_json()
    if header_max is not None and len(header_json) > header_max:
        marker = {
            "name": entry.name,
            "version": entry.version,
            "digest": entry.digest,
            "bytes": len(header_json),
        }
        header_json = json.dumps({TRUNCATED_KEY: marker}, sort_keys=True).encode()
    schema = card_schema(entry.header.dtype, {METADATA_KEY: header_json})
    descriptor = flight.FlightDescriptor.for_path(entry.name, str(entry.version))
    locations = [flight.Location(u) for u in entry.locations]
    endpoint = flight.FlightEndpoint(
        entry.digest.encode(), locations, app_metadata=holders_metadata(holders or {})
    )
    return flight.FlightInfo(
        schema,
        descriptor,
        [endpoint],
        total_records=entry.rows,
        total_bytes=entry.size,
        ordered=True,
        app_metadata=header_json,
    )


def truncated_ref(info: Any) -> tuple[str, str, str] | None:
    """(name, version, digest) of a listing entry whose header came truncated, else None."""
    raw = bytes(info.app_metadata)
    if not raw.startswith(b'{"' + TRUNCATED_KEY.encode()):
        return None
    try:
        marker = json.loads(raw)[TRUNCATED_KEY]
        name, version, digest = check_name(marker["name"]), check_version(marker["version"]), marker["digest"]
        return name, version, check_digest(digest)
    except (ValueError, KeyError, TypeError, CardError):
        raise PeerError("peer listed a truncated entry whose marker is malformed") from None


def entry_from_flight_info(info: Any) -> CatalogEntry:
    """Parse a peer's FlightInfo; a malformed one is the peer's fault (PeerError)."""
    raw = bytes(info.app_metadata)
    try:
        header = CardHeader.from_json(raw)
    except CardError as e:
        raise PeerError(f"peer listed a card whose header is invalid: {e}") from None
    if not header.digest:
        raise PeerError(f"peer listed {header.ref} without a digest")
    endpoints = list(info.endpoints)
    if len(endpoints) != 1:
        raise PeerError(f"peer listed {header.ref} with {len(endpoints)} endpoints; expected 1")
    ep = endpoints[0]
    ticket = bytes(ep.ticket.ticket).decode("ascii", "replace")
    if ticket != header.digest:
        raise PeerError(f"peer listed {header.ref} with ticket {ticket[:16]}… that is not its digest")
    locs = []
    for loc in list(ep.locations)[:64]:
        uri = loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri)
        locs.append(uri)
    holders = tuple(parse_holders(getattr(ep, "app_metadata", b"")).items())
    size, rows = int(info.total_bytes), int(info.total_records)
    if size <= 0 or rows <= 0:
        raise PeerError(f"peer listed {header.ref} with size {size} and rows {rows}; both must be > 0")
    if rows > MAX_ROWS:
        raise PeerError(f"peer listed {header.ref} with {rows} rows; a card has at most {MAX_ROWS}")
    return CatalogEntry(
        header=header, size=size, rows=rows, locations=tuple(dedupe(locs)), header_json=raw, holders=holders
    )


MAX_HOLDERS_LISTED = 64


def holders_metadata(holders: Mapping[str, str]) -> bytes:
    """An endpoint's app_metadata naming partial holders (uri -> bitfield); b"" when none."""
    if not holders:
        return b""
    items = dict(list(holders.items())[:MAX_HOLDERS_LISTED])
    return json.dumps({"holders": items}, sort_keys=True).encode()


def parse_holders(raw: Any) -> dict[str, str]:
    """The holders an endpoint's app_metadata names (empty for anything else: older nodes)."""
    data = bytes(raw or b"")
    if not data:
        return {}
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    h = obj.get("holders") if isinstance(obj, dict) else None
    if not isinstance(h, dict):
        return {}
    return {
        k: v
        for k, v in list(h.items())[:MAX_HOLDERS_LISTED]
        if isinstance(k, str) and "://" in k and len(k) <= 512 and isinstance(v, str) and len(v) <= 2048
    }


def descriptor_ref(path: list[bytes]) -> tuple[str, str]:
    """[name, version|'latest'] from a descriptor path."""
    if len(path) != 2:
        raise CardError(f"descriptor path must be [name, version], got {len(path)} parts")
    try:
        name, version = (p.decode("utf-8") for p in path)
    except UnicodeDecodeError:
        raise CardError("descriptor path is not UTF-8") from None
    return check_name(name), check_version(version)


_VERSION_RE = re.compile(r"[0-9]{1,16}")
# Largest card a node accepts by do_put or fetches from a peer, unless configured otherwise.
MAX_CARD_BYTES = 8 << 30


def check_version(version: object) -> str:
    """A requested version: 'latest' or a decimal integer 1 ≤ v < 2**53, as a string."""
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if version == "latest":
        return "latest"
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or not 1 <= int(version) < 2**53:
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:40] + "…"
        raise CardError(f"version {shown} must be a positive integer (below 2**53) or 'latest'")
    return version


def parse_ticket(ticket: bytes) -> str:
    try:
        return check_digest(bytes(ticket).decode("ascii"))
    except UnicodeDecodeError:
        raise CardError("ticket is not an ASCII digest") from None


# -- several cards in one do_get (a "bundle"; docs/protocol.md, "Catching up: bundles")
# A node that serves bundles says so in `health` and `node-info`: {"get_many": MAX_BUNDLE_CARDS}.
# A peer that does not advertise it is fetched card by card (one do_get per digest).
GET_MANY_KEY = "get_many"
BUNDLE_PREFIX = b"cards:"
MAX_BUNDLE_CARDS = 256
BUNDLE_CHUNK_BYTES = 4 << 20  # a bundle batch carries at most about this many file bytes


def bundle_ticket(digests: Iterable[str]) -> bytes:
    """The do_get ticket asking for several cards: b"cards:" + comma-separated digests."""
    ds = [check_digest(d) for d in digests]
    if not 1 <= len(ds) <= MAX_BUNDLE_CARDS:
        raise CardError(f"a bundle names 1 to {MAX_BUNDLE_CARDS} digests, not {len(ds)}")
    return BUNDLE_PREFIX + ",".join(ds).encode("ascii")


def parse_bundle_ticket(ticket: bytes) -> list[str] | None:
    """The digests a bundle ticket names (deduplicated, in order), or None for a plain ticket."""
    raw = bytes(ticket)
    if not raw.startswith(BUNDLE_PREFIX):
        return None
    try:
        text = raw[len(BUNDLE_PREFIX) :].decode("ascii")
    except UnicodeDecodeError:
        raise CardError("bundle ticket is not ASCII: b'cards:' then comma-separated hex digests") from None
    parts = text.split(",") if text else []
    if not 1 <= len(parts) <= MAX_BUNDLE_CARDS:
        raise CardError(f"a bundle ticket names 1 to {MAX_BUNDLE_CARDS} digests, not {len(parts)}")
    return dedupe(check_digest(p) for p in parts)


def bundle_schema() -> Any:
    """The schema of a bundle stream: each row is one piece of one card's file.

    digest: the card; size: the whole file's bytes (-1: this node does not hold that card,
    data empty); offset: where `data` starts in the file. A card's pieces arrive in order and
    contiguous, cards one after another in the ticket's order.
    """
    import pyarrow as pa

    return pa.schema(
        [("digest", pa.string()), ("size", pa.int64()), ("offset", pa.int64()), ("data", pa.binary())],
        metadata={b"loraflight-bundle": b"1"},
    )


# ... and how many do_get streams one client may run on it at once: {"get_streams": 3}. A
# client runs no more bundles than that to one node (a stream beyond it would wait for a slot
# on the node, and be refused as busy after the node's wait, on a slow link).
GET_STREAMS_KEY = "get_streams"


def advertised_get_streams(health: Mapping[str, Any]) -> int:
    """How many do_get streams a peer lets one client run at once, from its `health` (0: not said)."""
    n = health.get(GET_STREAMS_KEY)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return 0
    return min(n, 1024)


def advertised_get_many(health: Mapping[str, Any]) -> int:
    """How many cards a peer serves per bundle, from its `health`/`node-info` (0: none, card by card)."""
    n = health.get(GET_MANY_KEY)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        return 0
    return min(n, MAX_BUNDLE_CARDS)


def parse_json_body(body: bytes | None, what: str) -> dict[str, Any]:
    data = bytes(body or b"")
    if len(data) > MAX_ACTION_BODY:
        raise CardError(f"{what} body is {len(data)} bytes; the limit is {MAX_ACTION_BODY}")
    if not data:
        return {}
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also absurd integers
        raise CardError(f"{what} body is not UTF-8 JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CardError(f"{what} body must be a JSON object")
    return raw


# --------------------------------------------------------------------------- errors

# code -> (class a client raises, Flight error class name a server raises)
_CODES: dict[str, tuple[type[LoraflightError], str]] = {
    "trust": (TrustError, "FlightServerError"),
    "card": (CardError, "FlightServerError"),
    "conflict": (ConflictError, "FlightServerError"),
    "notfound": (CardNotFound, "FlightServerError"),
    "auth": (AuthError, "FlightUnauthenticatedError"),
    "store": (StoreError, "FlightServerError"),
    "config": (ConfigError, "FlightServerError"),
    "peer": (PeerError, "FlightServerError"),
    "busy": (PeerError, "FlightUnavailableError"),
    "internal": (PeerError, "FlightInternalError"),
}
_CODE_RE = re.compile(r"\[lf:([a-z]+)\] ?(.*)", re.S)


def error_code(exc: BaseException) -> str:
    for code, cls in (
        ("busy", BusyError),
        ("trust", TrustError),
        ("conflict", ConflictError),
        ("notfound", CardNotFound),
        ("auth", AuthError),
        ("store", StoreError),
        ("config", ConfigError),
        ("card", CardError),
        ("peer", PeerError),
    ):
        if isinstance(exc, cls):
            return code
    return "internal"


def to_flight_error(exc: BaseException, flight: Any) -> Exception:
    """The Flight error a server raises for `exc`: message `[lf:code] text`, no traceback."""
    code = error_code(exc)
    cls_name = _CODES[code][1]
    if isinstance(exc, AuthError) and "denied" in str(exc):
        cls_name = "FlightUnauthorizedError"
    text = str(exc) if code != "internal" else f"internal error ({type(exc).__name__}); see the server log"
    return getattr(flight, cls_name)(f"[lf:{code}] {text}")


def from_flight_error(exc: BaseException, where: str = "") -> LoraflightError:
    """Map a Flight error a client caught back onto the loraflight hierarchy."""
    msg = str(exc)
    # gRPC wraps the text: "Flight returned ... error, with message: [lf:..] ...". Find ours.
    idx = msg.find("[lf:")
    prefix = f"{where}: " if where else ""
    if idx >= 0:
        m = _CODE_RE.match(msg[idx:])
        if m and m.group(1) in _CODES:
            text = m.group(2).split(". Detail:")[0].strip()
            cls = BusyError if m.group(1) == "busy" else _CODES[m.group(1)][0]
            return cls(prefix + text)
    name = type(exc).__name__
    if name in ("FlightUnauthenticatedError", "FlightUnauthorizedError"):
        return AuthError(f"{prefix}refused: {_short(msg)}; check the token or client certificate")
    if name == "FlightTimedOutError":
        return PeerError(f"{prefix}timed out: {_short(msg)}")
    if name == "FlightUnavailableError":
        return PeerError(f"{prefix}unreachable: {_short(msg)}")
    if name == "FlightCancelledError":
        return PeerError(f"{prefix}cancelled: {_short(msg)}")
    return PeerError(f"{prefix}{_short(msg)}")


def _short(msg: str, n: int = 400) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= n else msg[:n] + "…"


def is_unreachable(exc: BaseException) -> bool:
    """The peer could not be reached or did not answer in time (gRPC's own error, not a
    refusal the node sent): a kept connection to it is not worth keeping."""
    name = type(exc).__name__
    return name in ("FlightUnavailableError", "FlightTimedOutError") and "[lf:" not in str(exc)


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry: the peer is unreachable, busy or slow."""
    if is_unreachable(exc):
        return True
    name = type(exc).__name__
    if name in ("FlightUnavailableError", "FlightTimedOutError"):
        return "[lf:busy]" in str(exc)
    return isinstance(exc, BusyError)


def header_json_dict(headers: Mapping[str, Any], key: str) -> str | None:
    """First value of a (lower-cased) gRPC header as str, or None."""
    v = headers.get(key)
    if not v:
        return None
    first = v[0] if isinstance(v, (list, tuple)) else v
    return first.decode() if isinstance(first, bytes) else str(first)


__all__ = [
    "ACTIONS",
    "ACTION_DELETE",
    "ACTION_HAVE",
    "ACTION_HEALTH",
    "ACTION_HELLO",
    "ACTION_LIST",
    "ACTION_NODE_INFO",
    "ACTION_NOTIFY",
    "ACTION_WITHDRAW",
    "ACTION_WITHDRAWALS",
    "BUNDLE_CHUNK_BYTES",
    "BUNDLE_PREFIX",
    "GET_MANY_KEY",
    "GET_STREAMS_KEY",
    "LISTING_HEADER_BYTES",
    "LISTING_HEADER_KEY",
    "LIST_ACTION_KEY",
    "MAX_BUNDLE_CARDS",
    "PROTOCOL_HEADER",
    "PROTOCOL_MAJOR",
    "PROTOCOL_VERSION",
    "CatalogEntry",
    "Criteria",
    "advertised_get_many",
    "advertised_get_streams",
    "bundle_schema",
    "bundle_ticket",
    "check_protocol",
    "entry_from_flight_info",
    "entry_to_flight_info",
    "from_flight_error",
    "holders_metadata",
    "offer_filter",
    "parse_bundle_ticket",
    "parse_criteria",
    "parse_holders",
    "to_flight_error",
    "truncated_ref",
]
