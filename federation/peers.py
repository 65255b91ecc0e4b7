"""The peer table: who this node syncs with, and whether they are alive.

Peers come from three sources: mDNS announcements, static URIs, and DNS names. Each peer is
keyed by its node id once known (from TXT or from its `node-info`), so the same node reached
over several addresses or sources is one peer. Liveness is judged by `node-info` calls with a
timeout (never by mDNS TTLs): after `failures` consecutive failures a peer is *dropped*; dropped
peers are probed every `probe` seconds and come back on the first success. A peer that says
goodbye over mDNS leaves at once (unless a static or DNS entry also names it).

Who is a peer (docs/operations.md, "Security model"): a peer is *confirmed* when the operator
configured it (a static or DNS source), when it proved the fleet secret in a `hello`, or when
it answered over TLS with a certificate of the fleet CA (`Peer.proved`). Anything else (an
mDNS record, a `notify`) is an unconfirmed claim: capped in number (`MAX_UNCONFIRMED`), never
given a token, and never a sync source unless the fleet is open (`syncable`: no secret, no
fleet CA, where mDNS peers still sync, zero-config on a trusted LAN). An unconfirmed record
cannot take over a peer that answered as itself: a goodbye or an address change for a node
id counts only from the mDNS instance that announced it and at an address where it answered.
Addresses are kept in `uris.canonical_uri` form.

The table holds no sockets: the caller passes a `probe(uri, timeout) -> PeerInfo` function and
drives `due()` / `record()` from its own loop, so the logic is tested without a network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loraflight.errors import ConfigError

from .discovery import Announcement
from .ratelimit import SummaryLog
from .uris import canonical_uri, same_host_port

log = logging.getLogger(__name__)

LIVE = "live"
DROPPED = "dropped"
PENDING = "pending"  # known address, never answered yet
# Peers no operator, fleet secret or fleet CA vouches for (learnt from a `notify` or an mDNS
# record, which anyone on the LAN may send): at most this many at once, whatever their state.
MAX_UNCONFIRMED = 64
# Addresses named by a `hello` whose caller proved the fleet secret, waiting for our own probe.
MAX_HELLO = 256
# An address whose peer said goodbye is not taken back from a notify this long after: a
# notify the leaving node sent just before stopping can arrive after its goodbye.
DEPARTED_S = 10.0
MAX_DEPARTED = 256
_quiet = SummaryLog(log, 10.0)


@dataclass(frozen=True)
class PeerInfo:
    """What a successful probe (`node-info`) says about a peer."""

    node_id: str
    fleet: str
    epoch: int
    proto: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    proved: str = ""  # "secret" (its hello answer proved the fleet secret), "ca" (fleet-CA TLS), ""


@dataclass
class Peer:
    key: str  # node id, or "uri:<uri>" until the id is known
    node_id: str | None
    uris: list[str]
    sources: set[str]  # "mdns", "static", "dns:<name>"
    fleet: str | None = None
    epoch: int = -1
    state: str = PENDING
    failures: int = 0
    last_ok: float = 0.0
    last_try: float = float("-inf")
    first_seen: float = 0.0
    uri: str | None = None  # the address that answered last
    proved: str = ""  # what its last answer proved: "secret", "ca" or "" (see PeerInfo)
    verified: set[str] = field(default_factory=set)  # addresses where it answered as this node id
    instance: str = ""  # the mDNS instance whose record announced it (goodbyes count from it only)

    @property
    def confirmed(self) -> bool:
        """Configured by the operator (static, DNS), or proved the fleet secret or fleet CA."""
        return bool(self.proved) or any(not _ephemeral(s) for s in self.sources)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "uri": self.uri or (self.uris[0] if self.uris else None),
            "uris": list(self.uris),
            "sources": sorted(self.sources),
            "fleet": self.fleet,
            "epoch": self.epoch,
            "state": self.state,
            "failures": self.failures,
            "confirmed": self.confirmed,
            "last_ok_ago": (None if not self.last_ok or now is None else round(now - self.last_ok, 3)),
        }


def _ephemeral(source: str) -> bool:
    """Sources that vouch for a peer only while it is around (mDNS, a notify or hello it sent)."""
    return source in ("mdns", "notify", "hello")


def _canon(uris: Iterable[str], what: str) -> list[str]:
    out: list[str] = []
    for u in uris:
        try:
            c = canonical_uri(u)
        except ConfigError as e:
            _quiet.log(logging.INFO, f"bad-uri-{what}", "ignoring a peer address from %s: %s", what, e)
            continue
        if c not in out:
            out.append(c)
    return out


# Events handed to `on_event`: ("added" | "dropped" | "removed" | "back" | "epoch" | "confirmed",
# peer); "confirmed": a live peer just proved the fleet secret or CA (it may now be synced from)
EventCallback = Callable[[str, Peer], None]


class PeerTable:
    """Thread-safe table of peers with liveness bookkeeping."""

    def __init__(
        self,
        *,
        self_id: str,
        fleet: str,
        health_interval: float = 5.0,
        probe_interval: float = 15.0,
        failures: int = 3,
        forget_after: float = 3600.0,
        on_event: EventCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        open_fleet: bool = True,
    ) -> None:
        self.self_id = self_id
        self.fleet = fleet
        self.health_interval = health_interval
        self.probe_interval = probe_interval
        self.max_failures = failures
        self.forget_after = forget_after
        self._departed: dict[str, float] = {}  # address -> when its peer said goodbye (DEPARTED_S)
        self._on_event = on_event
        self._clock = clock
        self.open_fleet = open_fleet  # no fleet secret, no fleet CA: mDNS peers are sync sources
        self._lock = threading.RLock()
        self._peers: dict[str, Peer] = {}

    # -- inputs

    def announce(self, event: str, ann: Announcement) -> None:
        """An mDNS event from `Discovery` (quick: safe to call on its loop)."""
        if ann.node_id == self.self_id:
            return
        uris = _canon(ann.uris, "mdns")
        if event == "removed":
            self._goodbye(ann.node_id, ann.instance, uris)
            return
        if ann.fleet != self.fleet or not uris:
            return
        with self._lock:
            peer = self._peers.get(ann.node_id)
            if peer is None:
                if not self._room():
                    _quiet.log(
                        logging.WARNING,
                        "cap-mdns",
                        "ignoring mDNS peer %s: too many unconfirmed peers",
                        ann.node_id[:40],
                    )
                    return
                peer = self._merge_uris(ann.node_id, uris, "mdns")
                peer.fleet = ann.fleet
                peer.epoch = ann.epoch
                peer.instance = ann.instance
                # An announced peer is presumed live: the first health call confirms it.
                peer.state = LIVE
                peer.uri = uris[0]
                self._emit("added", peer)
                return
            if not self._vouches(peer, ann.instance, uris):
                # Another record claims this node id at addresses where it never answered: the
                # addresses wait apart, as claims; the peer itself is left as it is.
                _quiet.log(
                    logging.WARNING,
                    "spoof",
                    "mDNS record %s claims node id %s at %s, where it never "
                    "answered: not taken as its address",
                    ann.instance[:60],
                    ann.node_id[:40],
                    uris[0],
                )
                for u in uris:
                    if self.find_uri(u) is None and self._room():
                        self._merge_uris(None, [u], "mdns")
                return
            peer.sources.add("mdns")
            peer.instance = peer.instance or ann.instance
            for u in uris:
                if u not in peer.uris:
                    peer.uris.append(u)
            if peer.state == DROPPED:
                # It announced itself again (a restart): probe it at once.
                peer.last_try = float("-inf")
            if ann.epoch > peer.epoch:
                peer.epoch = ann.epoch
                if peer.state == LIVE:
                    self._emit("epoch", peer)

    @staticmethod
    def _vouches(peer: Peer, instance: str, uris: list[str]) -> bool:
        """Whether an mDNS record may speak for `peer`: it has not answered anywhere yet, or the
        record comes from its instance and names an address where it answered."""
        if not peer.verified or peer.state != LIVE:
            return True
        if peer.instance and instance and instance != peer.instance:
            return False
        return not uris or any(u in peer.verified for u in uris)

    def set_static(self, source: str, uris: Iterable[str]) -> None:
        """Replace the URIs a static or DNS source names (e.g. after re-resolving a DNS name)."""
        uris = _canon(uris, source)
        with self._lock:
            for peer in list(self._peers.values()):
                if source in peer.sources and not any(u in uris for u in peer.uris):
                    peer.sources.discard(source)
                    if not peer.sources:
                        del self._peers[peer.key]
                        self._emit("removed", peer)
            for u in uris:
                holder = self.find_uri(u)
                if holder is None:
                    self._merge_uris(None, [u], source)
                else:
                    holder.sources.add(source)

    def add_address(self, source: str, uri: str) -> Peer | None:
        """Add one address (e.g. from a `notify` by an unknown peer) without touching others.

        None when the address is not a Flight address, or when `source` is ephemeral and
        `MAX_UNCONFIRMED` unconfirmed peers are known (`MAX_HELLO` for "hello": addresses whose
        caller proved the fleet secret), and none of them is a non-live one to forget first.
        """
        got = _canon([uri], source)
        if not got:
            return None
        uri = got[0]
        with self._lock:
            holder = self.find_uri(uri)
            if holder is None:
                left = self._departed.get(uri)
                if source == "notify" and left is not None and self._clock() - left < DEPARTED_S:
                    log.debug("ignoring a notify naming %s: its peer said goodbye just now", uri)
                    return None
                if _ephemeral(source) and not self._room(hello=source == "hello"):
                    _quiet.log(
                        logging.WARNING,
                        f"cap-{source}",
                        "ignoring peer address %s from %s: too many unconfirmed peers",
                        uri,
                        source,
                    )
                    return None
                return self._merge_uris(None, [uri], source)
            holder.sources.add(source)
            return holder

    def _unconfirmed(self, hello: bool = False) -> list[Peer]:
        return [p for p in self._peers.values() if not p.confirmed and (("hello" in p.sources) == hello)]

    def _room(self, hello: bool = False) -> bool:
        """Whether one more unconfirmed peer fits (forgetting the oldest non-live one if need be)."""
        waiting = self._unconfirmed(hello)
        if len(waiting) < (MAX_HELLO if hello else MAX_UNCONFIRMED):
            return True
        idle = [p for p in waiting if p.state != LIVE]
        if not idle:
            return False
        old = min(idle, key=lambda p: p.first_seen)
        del self._peers[old.key]
        if old.state != PENDING:
            self._emit("removed", old)
        return True

    def _merge_uris(self, node_id: str | None, uris: list[str], source: str) -> Peer:
        key = node_id or f"uri:{uris[0]}"
        now = self._clock()
        peer = Peer(key=key, node_id=node_id, uris=uris, sources={source}, first_seen=now)
        self._peers[key] = peer
        return peer

    def _goodbye(self, node_id: str, instance: str = "", uris: Iterable[str] = ()) -> None:
        with self._lock:
            peer = self._peers.get(node_id)
            if peer is None:
                return
            if not self._vouches(peer, instance, list(uris)):
                _quiet.log(
                    logging.WARNING,
                    "spoof-bye",
                    "ignoring an mDNS goodbye for %s from %s: not the record it answered at",
                    node_id[:40],
                    instance[:60] or "an unknown record",
                )
                return
            # A notify-learnt address is as ephemeral as the mDNS record: both go with the goodbye.
            peer.sources = {s for s in peer.sources if not _ephemeral(s)}
            if not peer.sources:
                del self._peers[node_id]
                now = self._clock()
                for u in [*peer.uris, *([peer.uri] if peer.uri else [])]:
                    self._departed.pop(u, None)  # re-inserted: the oldest goodbye goes first
                    self._departed[u] = now
                while len(self._departed) > MAX_DEPARTED:
                    self._departed.pop(next(iter(self._departed)))
                log.info("peer %s said goodbye", node_id)
                self._emit("removed", peer)

    # -- liveness

    def due(self) -> list[tuple[Peer, list[str]]]:
        """Peers whose health call (live) or probe (dropped, pending) is due, with URIs to try."""
        now = self._clock()
        out = []
        with self._lock:
            for peer in list(self._peers.values()):
                if (
                    peer.state == DROPPED
                    and all(_ephemeral(s) for s in peer.sources)
                    and now - peer.last_ok > self.forget_after
                ):
                    del self._peers[peer.key]
                    self._emit("removed", peer)
                    continue
                every = self.health_interval if peer.state == LIVE else self.probe_interval
                if peer.state == PENDING or now - peer.last_try >= every:
                    if peer.state == PENDING and now - peer.last_try < min(every, self.health_interval):
                        continue
                    peer.last_try = now
                    uris = ([peer.uri] if peer.uri else []) + [u for u in peer.uris if u != peer.uri]
                    out.append((peer, uris))
        return out

    def record(self, peer: Peer, uri: str | None, info: PeerInfo | None, error: str = "") -> None:
        """The outcome of one health call / probe of `peer` (info None = it failed)."""
        with self._lock:
            if self._peers.get(peer.key) is not peer:
                # Merged or removed meanwhile: apply to whatever now holds this node.
                current = self._peers.get(info.node_id) if info else None
                if current is None:
                    return
                peer = current
            if info is None:
                peer.failures += 1
                if (
                    peer.state == PENDING
                    and peer.failures >= self.max_failures
                    and all(_ephemeral(s) for s in peer.sources)
                ):
                    # Only a notify named it and it never answered: forget it (a configured
                    # static or DNS address stays and keeps being probed).
                    del self._peers[peer.key]
                    log.info("forgetting %s: it never answered a health call (%s)", peer.key, error)
                    return
                if peer.state == LIVE and peer.failures >= self.max_failures:
                    peer.state = DROPPED
                    log.info(
                        "peer %s dropped after %d failed health calls: %s", peer.key, peer.failures, error
                    )
                    self._emit("dropped", peer)
                return
            if info.node_id == self.self_id or info.fleet != self.fleet:
                if info.fleet != self.fleet:
                    log.warning(
                        "peer %s (%s) belongs to fleet %r, not %r: ignored",
                        uri,
                        info.node_id,
                        info.fleet,
                        self.fleet,
                    )
                # A static URI that leads to ourselves or another fleet: keep it, never sync with it.
                peer.state = DROPPED
                peer.failures = self.max_failures
                peer.fleet = info.fleet
                peer.node_id = info.node_id
                return
            proved = info.proved
            if peer.node_id is None:
                other = self._peers.get(info.node_id)
                if (
                    other is not None
                    and other is not peer
                    and other.state == LIVE
                    and other.verified
                    and uri not in other.verified
                    and not (proved or peer.confirmed)
                ):
                    # An unconfirmed address answers with the node id of a peer that answers
                    # elsewhere: a claim, not the peer. Kept apart, never synced from.
                    _quiet.log(
                        logging.WARNING,
                        "spoof-id",
                        "%s answers as %s, which answers at %s: ignored as a claim",
                        uri,
                        info.node_id[:40],
                        other.uri,
                    )
                    peer.state = DROPPED
                    peer.failures = self.max_failures
                    peer.last_ok = self._clock()
                    return
                if other is not None and other is not peer:
                    # Same node reached through another source: fold this entry into it.
                    del self._peers[peer.key]
                    for u in peer.uris:
                        if u not in other.uris:
                            other.uris.append(u)
                    other.sources |= peer.sources
                    peer = other
                else:
                    del self._peers[peer.key]
                    peer.key = peer.node_id = info.node_id
                    self._peers[peer.key] = peer
            was, was_confirmed = peer.state, peer.confirmed
            peer.state = LIVE
            peer.failures = 0
            peer.last_ok = self._clock()
            peer.uri = uri
            peer.proved = proved
            if uri:
                peer.verified.add(uri)
            peer.fleet = info.fleet
            newer = info.epoch > peer.epoch
            peer.epoch = max(peer.epoch, info.epoch)
            if was == PENDING:
                self._emit("added", peer)
            elif was == DROPPED:
                log.info("peer %s is back", peer.key)
                self._emit("back", peer)
            elif newer:
                self._emit("epoch", peer)
            if was != PENDING and peer.confirmed and not was_confirmed:
                self._emit("confirmed", peer)

    # -- queries

    def live(self) -> list[Peer]:
        with self._lock:
            return [p for p in self._peers.values() if p.state == LIVE and p.node_id]

    def confirmed(self) -> list[Peer]:
        """Every confirmed peer (`Peer.confirmed`) whose node id is known, whatever its state."""
        with self._lock:
            return sorted((p for p in self._peers.values() if p.confirmed and p.node_id), key=lambda p: p.key)

    def believes(self, peer: Peer) -> bool:
        """Whether this node takes the peer's word (syncs from it, believes its gossip): a confirmed
        peer, and in an open fleet an mDNS peer too (never one only a `notify` named)."""
        return peer.confirmed or (self.open_fleet and "mdns" in peer.sources)

    def syncable(self) -> list[Peer]:
        """Live peers this node syncs from (`believes`)."""
        with self._lock:
            return [p for p in self._peers.values() if p.state == LIVE and p.node_id and self.believes(p)]

    def is_source(self, uri: str) -> bool:
        """Whether `uri` is an address of a live peer this node syncs from (`believes`): it may
        be asked for pieces, and its `have` is believed."""
        got = _canon([uri], "source")
        if not got:
            return False
        with self._lock:
            return any(
                p.state == LIVE
                and self.believes(p)
                and any(same_host_port(got[0], u) for u in [*p.uris, *([p.uri] if p.uri else [])])
                for p in self._peers.values()
            )

    def vetted(self, uri: str) -> bool:
        """Whether `uri` is an address of a confirmed peer, whatever the scheme (a token and a
        fetch may go there)."""
        got = _canon([uri], "vetted")
        if not got:
            return False
        with self._lock:  # the scheme aside: a TLS node dials a grpc:// peer as grpc+tls://
            return any(
                p.confirmed and any(same_host_port(got[0], u) for u in [*p.uris, *([p.uri] if p.uri else [])])
                for p in self._peers.values()
            )

    def get(self, node_id: str) -> Peer | None:
        with self._lock:
            return self._peers.get(node_id)

    def find_uri(self, uri: str) -> Peer | None:
        """The peer holding `uri` (compared in `canonical_uri` form)."""
        if "://" in uri:
            got = _canon([uri], "lookup")
            uri = got[0] if got else uri
        with self._lock:
            for p in self._peers.values():
                if uri in p.uris or p.uri == uri:
                    return p
        return None

    def all(self) -> list[Peer]:
        with self._lock:
            return list(self._peers.values())

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self._clock()
            return [p.to_dict(now) for p in sorted(self._peers.values(), key=lambda p: p.key)]

    def _emit(self, event: str, peer: Peer) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event, peer)
        except Exception:
            log.exception("peer event handler failed (%s %s)", event, peer.key)


__all__ = ["DROPPED", "LIVE", "MAX_HELLO", "MAX_UNCONFIRMED", "PENDING", "Peer", "PeerInfo", "PeerTable"]
