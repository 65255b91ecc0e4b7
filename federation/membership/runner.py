"""The membership runner: carries `Swim`'s messages over Flight actions and applies its verdicts
to the node's `PeerTable`.

* ``lf-swim`` runs one protocol period every `probe_interval`: refresh the member list from the
  peer table's confirmed live peers, probe (`swim-ping`; no answer: `swim-ping-req` through a few
  others), push waiting news to `fanout` members (and again every `gossip_interval` between
  periods while news waits, as memberlist's gossip timer), and every `sync_interval` one anti-entropy
  exchange (`swim-sync`) with one random member.
* The peer table stays the one record the node reads: an answer is recorded as a successful
  health call (which also notes the peer's catalog epoch, so a higher one triggers a sync from
  it), and a member SWIM declares dead or departed is dropped there. Gossip about a node's epoch
  is recorded the same way when that node is a confirmed live peer, so sync is driven by gossip.
* Trust: news is applied only from a peer of this fleet the table believes (`PeerTable.believes`:
  confirmed, or an mDNS peer in an open fleet), and (when its addresses are IP literals) only
  when the call comes from one of them; the same holds for serving a ping-req. A member heard of only by gossip is
  handed to the peer table as an unconfirmed address; it becomes a sync source only once the
  table confirms it.
* A peer whose server does not know the actions (an older node) is checked by `health` in the
  peer loop as before (`handles` tells the loop which peers SWIM checks).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from loraflight.errors import CardError, LoraflightError

from ..client import Client
from ..peers import LIVE, Peer, PeerInfo, PeerTable
from .news import DEAD, LEFT, News
from .settings import Settings
from .swim import PROBE_STATES, Event, Swim
from .wire import ACTION_PING, ACTION_PING_REQ, ACTION_SYNC, Message, parse_message

log = logging.getLogger("loraflight.federation.membership")

MAX_PING_REQS = 8  # ping-reqs this node serves at once; more are answered "no ack" at once
LEGACY_RETRY_S = 60.0  # a peer that did not know the actions is asked again after this long
ItemHandler = Callable[[News], None]


class SwimClient(Client):
    """A `Client` that also speaks the membership actions."""

    def call(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._action(kind, body)


def boot_incarnation() -> int:
    """A restarted node's incarnation: milliseconds since 1970, above any it held before (each
    refutation adds 1, and a node does not refute a thousand times a second)."""
    return int(time.time() * 1000)


def caller_host(peer: str) -> str:
    """The host of a gRPC peer string ('ipv4:10.0.0.2:5000', 'ipv6:[::1]:5000'); '' if unknown."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _peer_uri(peer: Peer) -> str:
    return peer.uri or (peer.uris[0] if peer.uris else "")


class Membership:
    """SWIM for one node (see the module doc); `run` is its thread, `handle` its server side."""

    def __init__(
        self,
        settings: Settings,
        *,
        self_id: str,
        fleet: str,
        peers: PeerTable,
        uri: Callable[[], str],
        epoch: int,
        client: Callable[[str, float], SwimClient],
        stop: threading.Event,
        incarnation: int | None = None,
        rng: random.Random | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_change = on_change  # a member's state changed (the node rewrites its status file)
        self.fleet = fleet
        self.peers = peers
        self._uri = uri
        self._client = client
        self._stop = stop
        self._rng = rng or random.Random()
        self.swim = Swim(
            self_id,
            uri(),
            boot_incarnation() if incarnation is None else incarnation,
            settings.params,
            epoch=epoch,
            rng=self._rng,
            may_probe=self._may_probe,
        )
        self._lock = threading.Lock()  # guards self.swim; never held during a call
        # peers without the actions (when we learnt it): the peer loop checks them, and they are
        # asked again after LEGACY_RETRY_S (an older node may be upgraded and restarted)
        self._legacy: dict[str, float] = {}
        self._inflight: set[str] = set()
        self._seen_version = -1
        self._gossiped: set[str] = set()  # addresses heard of only by gossip (never a sync source)
        self._probes = ThreadPoolExecutor(max_workers=6, thread_name_prefix="lf-swim-probe")
        self._reqs = ThreadPoolExecutor(max_workers=6, thread_name_prefix="lf-swim-req")
        self._req_slots = threading.BoundedSemaphore(MAX_PING_REQS)
        self._handlers: dict[str, list[ItemHandler]] = {}
        self.counts: dict[str, int] = dict.fromkeys(
            ("pings", "acks", "ping_reqs", "syncs", "suspected", "dead", "refuted", "ignored"), 0
        )

    # ------------------------------------------------------------------ what the node asks

    def handles(self, peer: Peer) -> bool:
        """Does SWIM check this peer's liveness (the peer loop then skips its health calls)? Yes
        for a confirmed live peer SWIM holds alive or suspect; the peer loop checks the rest (a
        peer the table holds live that SWIM holds dead or gone, too, until one of them yields)."""
        if not (peer.node_id and peer.state == LIVE and self.peers.believes(peer)) or self._is_legacy(
            peer.node_id or ""
        ):
            return False
        m = self.swim.members.get(peer.node_id)
        return m is not None and m.state in PROBE_STATES

    def _is_legacy(self, node_id: str) -> bool:
        since = self._legacy.get(node_id)
        if since is not None and time.monotonic() - since >= LEGACY_RETRY_S:
            self._legacy.pop(node_id, None)
            return False
        return since is not None

    def may_sync(self, peer: Peer) -> bool:
        """May the node sync from this peer? Not while it is unconfirmed and known only from an
        address gossip named (a confirmed peer, or one that said hello itself, may)."""
        return self.peers.believes(peer) or not any(u in self._gossiped for u in peer.uris)

    def _may_probe(self, node_id: str) -> bool:
        peer = self.peers.get(node_id)
        return peer is not None and self.handles(peer)

    def _confirmed_live(self) -> list[Peer]:
        return self.peers.syncable()  # live and believed: confirmed, or mDNS in an open fleet

    def local_change(self, epoch: int, fanout: int = 0) -> list[Peer]:
        """This node's catalog changed: gossip the epoch; the peers to `notify` at once (a random
        `fanout` of the live ones, confirmed first; `fanout` 0: the membership's) are returned."""
        with self._lock:
            self.swim.set_epoch(epoch)
        fanout = max(fanout, self.settings.params.fanout)
        confirmed = self._confirmed_live()
        picked = self._rng.sample(confirmed, min(fanout, len(confirmed)))
        if len(picked) < fanout:
            others = [p for p in self.peers.live() if p not in confirmed]
            picked += self._rng.sample(others, min(fanout - len(picked), len(others)))
        return picked

    def poll_keys(self) -> list[str]:
        """The safety poll syncs from one random confirmed live peer (any live one if none is)."""
        pool = self._confirmed_live() or self.peers.live()
        return [self._rng.choice(pool).key] if pool else []

    def publish(self, topic: str, key: str, version: int, value: Any) -> None:
        """Gossip a small typed item (JSON `value`, ≤ 1 KiB); every member's `on_item(topic)`
        handlers get it once, the highest `version` per (topic, key) winning."""
        with self._lock:
            self.swim.publish(topic, key, version, value)

    def on_item(self, topic: str, handler: ItemHandler) -> None:
        """Call `handler(news)` for every new item of `topic` gossiped by a confirmed member."""
        self._handlers.setdefault(topic, []).append(handler)

    def items(self, topic: str) -> list[News]:
        with self._lock:
            return [n for (t, _k), n in self.swim.items.items() if t == topic]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = self.swim.snapshot()
        out["legacy_peers"] = sorted(self._legacy)
        out["counts"] = dict(self.counts)
        return out

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """One period every `probe_interval`; between periods, a gossip round every
        `gossip_interval` while news waits, and a wake when a suspicion runs out (a dead verdict
        does not wait for the next period)."""
        interval = self.settings.params.probe_interval
        gossip_every = min(self.settings.gossip_interval, interval)
        now = time.monotonic()
        next_sync = now + self.settings.sync_interval * self._rng.random()
        next_period, next_gossip = now + interval, now + gossip_every
        while True:
            with self._lock:
                expiry = self.swim.next_expiry()
            # news can arrive at any time (a probe thread's verdict, a call): look every gossip tick
            wake = min(next_period, next_gossip, expiry if expiry is not None else next_period)
            if self._stop.wait(max(0.0, wake - time.monotonic())):
                return
            try:
                now = time.monotonic()
                if now >= next_period:
                    next_period = max(next_period + interval, now + interval / 2)
                    next_gossip = now + gossip_every
                    self.period()
                    if time.monotonic() >= next_sync:
                        next_sync = time.monotonic() + self.settings.sync_interval
                        self._submit(self.anti_entropy)
                    continue
                if now >= next_gossip:
                    next_gossip = now + gossip_every
                    self.gossip()
                self.expire()
            except Exception:  # one bad period must not end membership for good
                log.exception("membership period failed; trying again next period")

    def gossip(self) -> None:
        """A gossip round between periods: ping `fanout` random members with the waiting news
        (nothing when no news waits)."""
        with self._lock:
            targets = self.swim.gossip_targets([])
        for n in targets:
            self._submit(self.probe, n, False)

    def expire(self) -> None:
        """Suspicions that ran out become dead verdicts now (between periods)."""
        with self._lock:
            self.swim.tick()
            events = self._drain()
        self._apply(events)

    def period(self) -> None:
        rejoin: list[str] = []
        with self._lock:
            self.swim.uri = self._uri()
            for p in self._confirmed_live():
                if not self._is_legacy(p.node_id or "") and self.swim.offer(
                    p.node_id or "", _peer_uri(p), p.epoch
                ):
                    rejoin.append(p.node_id or "")
            self.swim.tick()
            targets = self.swim.probe_targets()
            extra = self.swim.gossip_targets(targets)
            events = self._drain()
            changed, self._seen_version = self.swim.version != self._seen_version, self.swim.version
        self._apply(events)
        if changed and self.on_change is not None:
            self.on_change()  # at most once a period, and never while nothing changes
        for n in targets:
            self._submit(self.probe, n, True)
        for n in extra + rejoin:
            self._submit(self.probe, n, False)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # shutting down
            self._probes.submit(fn, *args)

    def _drain(self) -> list[Event]:
        events, self.swim.events = self.swim.events, []
        return events

    def close(self) -> None:
        self._probes.shutdown(wait=True, cancel_futures=True)
        self._reqs.shutdown(wait=True, cancel_futures=True)

    def leave(self) -> None:
        """Tell `fanout` members this node is leaving (best effort, one probe timeout)."""
        with self._lock:
            self.swim.leave()
            targets = self.swim.gossip_targets([])
        futs = []
        for n in targets:
            with contextlib.suppress(RuntimeError):
                futs.append(self._reqs.submit(self._ping, n))
        if futs:
            wait(futs, timeout=self.settings.probe_timeout + 0.5)

    # ------------------------------------------------------------------ calls

    def _call(self, uri: str, kind: str, body: dict[str, Any], timeout: float) -> Message:
        with self._client(uri, timeout) as c:
            return parse_message(c.call(kind, body), f"{kind} answer from {uri}")

    def _ping(self, node_id: str) -> Message | None:
        """One direct ping; its answer (applied), or None. An older peer is marked legacy."""
        peer = self.peers.get(node_id)
        if peer is None or (self._stop.is_set() and not self.swim.leaving):
            return None
        uri = _peer_uri(peer)
        with self._lock:
            body = self.swim.message(node_id, fleet=self.fleet)
        self.counts["pings"] += 1
        try:
            msg = self._call(uri, ACTION_PING, body, self.settings.probe_timeout)
        except CardError as e:
            if "unknown action" in str(e):
                log.info("peer %s does not speak SWIM; checking it by health calls", node_id)
                self._legacy[node_id] = time.monotonic()
            return None
        except (LoraflightError, OSError, ValueError) as e:
            log.debug("swim-ping %s (%s) failed: %s", node_id, uri, e)
            return None
        self.counts["acks"] += 1
        self._heard(msg, msg.sender == node_id, peer, uri)
        return msg

    def probe(self, node_id: str, indirect: bool) -> None:
        """Probe one member; with `indirect`, through helpers when it does not answer, and
        suspect it when they cannot reach it either."""
        with self._lock:
            if node_id in self._inflight:
                return
            self._inflight.add(node_id)
        try:
            if self._ping(node_id) is not None or not indirect or self._is_legacy(node_id):
                return
            with self._lock:
                helpers = self.swim.helpers_for(node_id)
            futs = []
            for h in helpers:
                with contextlib.suppress(RuntimeError):
                    futs.append(self._reqs.submit(self._ping_req, h, node_id))
            done, _ = wait(futs, timeout=self.settings.probe_timeout * 2 + 0.5)
            reached = any(f in done and f.exception() is None and f.result() for f in futs)
            peer = self.peers.get(node_id)
            with self._lock:
                if reached:
                    self.swim.probe_ok(node_id)
                elif not self._stop.is_set():
                    self.swim.probe_failed(node_id)
                events = self._drain()
            if reached and peer is not None:
                self.peers.record(
                    peer, _peer_uri(peer), PeerInfo(node_id, peer.fleet or self.fleet, peer.epoch)
                )
            self._apply(events)
        finally:
            with self._lock:
                self._inflight.discard(node_id)

    def _ping_req(self, helper: str, target: str) -> bool:
        peer = self.peers.get(helper)
        if peer is None:
            return False
        with self._lock:
            body = self.swim.message(helper, fleet=self.fleet, target=target)
        self.counts["ping_reqs"] += 1
        try:
            msg = self._call(_peer_uri(peer), ACTION_PING_REQ, body, self.settings.probe_timeout * 2)
        except (LoraflightError, OSError, ValueError) as e:
            log.debug("swim-ping-req via %s failed: %s", helper, e)
            return False
        self._heard(msg, msg.sender == helper, peer, None)
        return msg.ack

    def anti_entropy(self) -> None:
        """Exchange member lists and epochs with one random member."""
        with self._lock:
            target = self.swim.sync_target()
            if target is None:
                return
            body = self.swim.message(target, fleet=self.fleet, **self.swim.digest())
        peer = self.peers.get(target)
        if peer is None:
            return
        self.counts["syncs"] += 1
        try:
            msg = self._call(_peer_uri(peer), ACTION_SYNC, body, self.settings.probe_timeout * 2)
        except (LoraflightError, OSError, ValueError) as e:
            log.debug("swim-sync with %s failed: %s", target, e)
            return
        self._heard(msg, msg.sender == target, peer, None)

    # ------------------------------------------------------------------ applying

    def _heard(self, msg: Message, ours: bool, peer: Peer, uri: str | None) -> None:
        """An answer from the member we called (`ours`: it is who we think it is)."""
        trusted = ours and msg.fleet == self.fleet and self.peers.believes(peer)
        with self._lock:
            self.swim.receive(msg, trusted)
            if ours and trusted:
                self.swim.probe_ok(msg.sender, msg.incarnation, msg.epoch)
            elif ours:
                self.swim.probe_ok(msg.sender)
            events = self._drain()
        if uri is not None and ours:
            # A direct answer is a health answer: the table notes it (and a higher epoch syncs).
            self.peers.record(peer, uri, PeerInfo(msg.sender, msg.fleet, msg.epoch))
        self._apply(events)

    def _apply(self, events: list[Event]) -> None:
        for what, node_id, detail in events:
            peer = self.peers.get(node_id)
            if what in (DEAD, LEFT):
                self.counts["dead"] += 1
                if peer is not None and peer.state == LIVE:
                    log.info("peer %s %s (SWIM)", node_id, "declared dead" if what == DEAD else "left")
                    for _ in range(max(1, self.peers.max_failures)):
                        self.peers.record(peer, None, None, f"SWIM: {what}")
                        if peer.state != LIVE:
                            break
            elif what == "suspect":
                self.counts["suspected"] += 1
                log.info("peer %s suspected", node_id)
            elif what == "refuted":
                self.counts["refuted"] += 1
                log.info("refuted being %s (incarnation %d)", detail, self.swim.incarnation)
            elif what == "joined" and peer is None and self.peers.find_uri(str(detail)) is None:
                if str(detail) not in self._uri_set() and len(self._gossiped) < 4096:
                    self._gossiped.add(str(detail))
                    self.peers.add_address("notify", str(detail))  # the table checks and confirms it
            elif what == "alive" and peer is not None and peer.state != LIVE:
                self._submit(self.probe, node_id, False)  # it refuted: check it directly
            elif what == "epoch" and peer is not None:
                if self.peers.believes(peer) and peer.state == LIVE and int(detail) > peer.epoch:
                    self.peers.record(
                        peer, _peer_uri(peer), PeerInfo(node_id, peer.fleet or self.fleet, int(detail))
                    )
            elif what == "item" and isinstance(detail, News):
                for h in self._handlers.get(detail.topic, []):
                    try:
                        h(detail)
                    except Exception:
                        log.exception("membership item handler failed (%s)", detail.topic)

    def _uri_set(self) -> set[str]:
        return {self._uri()}

    # ------------------------------------------------------------------ server side

    def _trusted(self, msg: Message, caller: str) -> Peer | None:
        """The sender's peer entry when its news may be believed (believed by the peer table, same
        fleet, and calling from one of its addresses when those are IP literals)."""
        if msg.fleet != self.fleet:
            return None
        peer = self.peers.get(msg.sender)
        if peer is None or not self.peers.believes(peer):
            return None
        host = _ip(caller_host(caller))
        ips = [_ip(urlsplit(u).hostname or "") for u in peer.uris]
        if host is not None and ips and all(ip is not None for ip in ips) and host not in ips:
            return None
        return peer

    def handle(self, kind: str, body: bytes, caller: str = "") -> bytes:
        """Answer one membership action (the node's Flight service calls this)."""
        msg = parse_message(body, f"{kind} body")
        peer = self._trusted(msg, caller)
        if peer is None:
            self.counts["ignored"] += 1
            stranger = self.peers.get(msg.sender) is None and self.peers.find_uri(msg.uri) is None
            if msg.fleet == self.fleet and stranger and not self._said_it_left(msg):
                # Like a notify from a stranger: the peer table health-checks it first.
                self.peers.add_address("notify", msg.uri)
        extra: dict[str, Any] = {}
        if kind == ACTION_PING_REQ:
            extra["ack"] = self._serve_ping_req(msg.target) if peer is not None else False
        with self._lock:
            self.swim.uri = self.swim.uri or self._uri()  # called before our first period
            self.swim.receive(msg, peer is not None)
            if kind == ACTION_SYNC:
                extra.update(self.swim.digest())
            reply = self.swim.message(msg.sender, fleet=self.fleet, **extra)
            events = self._drain()
        if peer is not None and kind != ACTION_PING_REQ:
            # It called us: as good as a health answer (a dropped peer comes back at once).
            uri = msg.uri if msg.uri in peer.uris else _peer_uri(peer)
            self.peers.record(peer, uri, PeerInfo(msg.sender, self.fleet, msg.epoch))
        self._apply(events)
        return json.dumps(reply).encode()

    def _said_it_left(self, msg: Message) -> bool:
        """Is this message from a node that is leaving (its own `left` rides on it, or this table
        holds it departed at its incarnation)? Such a stranger is not handed to the peer table:
        a goodbye followed by its last gossip must not bring it back."""
        if any(n.kind == LEFT and n.node == msg.sender for n in msg.news):
            return True
        with self._lock:
            m = self.swim.members.get(msg.sender)
        return m is not None and m.state == LEFT and m.incarnation >= msg.incarnation

    def _serve_ping_req(self, target: str) -> bool:
        if not target or not self._req_slots.acquire(blocking=False):
            return False
        try:
            peer = self.peers.get(target)
            if peer is None or not self.peers.believes(peer):
                return False  # only members we know ourselves: never a probe of any address
            return self._ping(target) is not None
        finally:
            self._req_slots.release()


def membership_action(m: Membership | None, kind: str, body: bytes, caller: str) -> bytes:
    """The Flight service's hook; with membership off, the answer an older node gives (callers
    then check this node by health calls)."""
    if m is None:
        raise CardError(
            f"unknown action {kind!r}: membership is off on this node (membership.enabled = false)"
        )
    return m.handle(kind, body, caller)


__all__ = [
    "LEGACY_RETRY_S",
    "MAX_PING_REQS",
    "ItemHandler",
    "Membership",
    "SwimClient",
    "boot_incarnation",
    "caller_host",
    "membership_action",
]
