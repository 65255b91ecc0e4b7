"""The SWIM member table: probing, suspicion, refutation, dissemination (pure rules).

No threads and no sockets: the runner (`runner.Membership`) asks this table whom to probe,
carries the messages it builds, and reports what came back; a fake clock and an in-process
network drive it in the tests.

* Each protocol period the node probes `probes` members, round-robin over a shuffled list of
  the members it may probe (so each one is probed at least once every 2 * ceil(N / probes)
  periods). A member that does not answer is probed indirectly through `indirect` others
  (ping-req); if none of them reaches it either, it is *suspect*.
* A suspect that does not refute within `suspicion_mult * max(1, log10 N) * probe_interval`
  seconds is *dead*. A suspicion travels with its age (how long the sender has held it), so
  every member's runs out at about the time the first suspector's does, instead of each
  member's timer starting when the news reached it. A member refutes by raising its incarnation above the one it is suspected
  (or declared dead) at and gossiping *alive*; a restarted node starts with an incarnation
  above anything the fleet holds for it (the runner derives it from the boot time).
* News (member states, catalog epochs, generic items) rides on every ping and ack (at most
  `max_news` items each), least-sent first, each item `retransmit_mult * ceil(log10(N + 1))`
  times (`news.NewsQueue`). While news waits, the node also pings `fanout` members per period
  in all (probes included), so a change spreads in O(log N) periods at a fixed cost per node.
* Anti-entropy: once per interval the runner exchanges `digest()`s with one random member.

News is applied only from senders the caller trusts (`receive(..., trusted=True)`: confirmed
peers); the table never decides trust itself.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .news import (
    ALIVE,
    DEAD,
    EPOCH,
    ITEM,
    LEFT,
    MEMBER_KINDS,
    SUSPECT,
    News,
    NewsQueue,
    newer,
)
from .wire import MAX_KNOWN, Message

PROBE_STATES = (ALIVE, SUSPECT)


@dataclass(frozen=True)
class SwimParams:
    probe_interval: float = 1.0  # seconds per protocol period
    probes: int = 1  # members probed per period
    indirect: int = 3  # members asked to probe one that did not answer
    fanout: int = 3  # members pinged per period while news waits (probes included)
    suspicion_mult: float = 4.0
    retransmit_mult: int = 4
    max_news: int = 16  # news items per message
    reap_after: float = 60.0  # seconds a dead or departed member stays in the table
    max_members: int = 4096
    max_items: int = 4096  # generic items kept (the newest version per topic and key)


@dataclass
class Member:
    node_id: str
    uri: str
    incarnation: int = 0
    state: str = ALIVE
    since: float = 0.0  # when it entered its state (local clock)
    epoch: int = -1  # its catalog epoch, as last heard

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "uri": self.uri,
            "incarnation": self.incarnation,
            "state": self.state,
            "epoch": self.epoch,
        }


Event = tuple[str, str, Any]  # (what, node id, detail): joined, alive, suspect, dead, left, epoch, item


class Swim:
    """One node's view of the fleet (see the module doc)."""

    def __init__(
        self,
        self_id: str,
        uri: str,
        incarnation: int,
        params: SwimParams | None = None,
        *,
        epoch: int = 0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        may_probe: Callable[[str], bool] = lambda _node: True,
    ) -> None:
        self.self_id = self_id
        self.uri = uri
        self.incarnation = incarnation
        self.params = params or SwimParams()
        self.epoch = epoch
        self.clock = clock
        self.rng = rng or random.Random()
        self.may_probe = may_probe
        self.members: dict[str, Member] = {}
        self.items: dict[tuple[str, str], News] = {}
        self.queue = NewsQueue(self.params.retransmit_mult)
        self.events: list[Event] = []
        self.refutations = 0
        self.leaving = False
        self.version = 0  # bumped on every change of a member or of this node's incarnation
        self._order: list[str] = []
        self._pos = 0

    # ------------------------------------------------------------------ local inputs

    def offer(self, node_id: str, uri: str, epoch: int = -1) -> bool:
        """A member the node knows first-hand (its peer table: confirmed and answering).

        Unknown: added alive at incarnation 0 (its own messages bring the real one). True when
        this table holds it dead or departed: the caller pings it, and the ping tells it so,
        so it can refute.
        """
        if node_id == self.self_id:
            return False
        m = self.members.get(node_id)
        if m is None:
            if len(self.members) >= self.params.max_members:
                return False
            self.members[node_id] = Member(node_id, uri, 0, ALIVE, self.clock(), epoch)
            self.version += 1
            return False
        if uri and m.state in PROBE_STATES:
            m.uri = uri
        return m.state not in PROBE_STATES

    def set_epoch(self, epoch: int) -> None:
        """This node's catalog changed: gossip its new epoch."""
        self.epoch = max(self.epoch, epoch)
        self.queue.add(News(EPOCH, self.self_id, self.epoch))

    def publish(self, topic: str, key: str, version: int, value: Any) -> News:
        """Gossip a generic item (the newest `version` per topic and key wins everywhere)."""
        item = News(ITEM, self.self_id, version, "", topic, key, value)
        self.items[(topic, key)] = item
        self.queue.add(item)
        return item

    def leave(self) -> None:
        """This node is stopping: gossip that it left (no refutation from now on)."""
        self.leaving = True
        self.queue.add(News(LEFT, self.self_id, self.incarnation))

    # ------------------------------------------------------------------ probing

    def _candidates(self) -> list[str]:
        return [n for n, m in self.members.items() if m.state in PROBE_STATES and self.may_probe(n)]

    def probe_targets(self) -> list[str]:
        """The members to probe this period (round-robin over a shuffled list)."""
        cands = set(self._candidates())
        out: list[str] = []
        reshuffled = False
        while len(out) < min(self.params.probes, len(cands)):
            if self._pos >= len(self._order):
                if reshuffled:
                    break
                self._order = sorted(cands)
                self.rng.shuffle(self._order)
                self._pos = 0
                reshuffled = True
            n = self._order[self._pos]
            self._pos += 1
            if n in cands and n not in out:
                out.append(n)
        return out

    def gossip_targets(self, already: list[str]) -> list[str]:
        """Extra members to ping this period so waiting news reaches `fanout` members."""
        if not len(self.queue):
            return []
        rest = [n for n in self._candidates() if n not in already]
        want = max(0, self.params.fanout - len(already))
        return self.rng.sample(rest, min(want, len(rest)))

    def helpers_for(self, node_id: str) -> list[str]:
        """Members to ask to probe `node_id` for us (ping-req)."""
        rest = [n for n in self._candidates() if n != node_id]
        return self.rng.sample(rest, min(self.params.indirect, len(rest)))

    def sync_target(self) -> str | None:
        """One random member for anti-entropy."""
        cands = self._candidates()
        return self.rng.choice(cands) if cands else None

    def probe_ok(self, node_id: str, incarnation: int | None = None, epoch: int | None = None) -> None:
        """`node_id` answered (directly, or through a helper)."""
        m = self.members.get(node_id)
        if m is None:
            return
        if incarnation is not None and incarnation > m.incarnation:
            self._apply(News(ALIVE, node_id, incarnation, m.uri))
        if epoch is not None:
            self._apply(News(EPOCH, node_id, epoch))

    def probe_failed(self, node_id: str) -> None:
        """Neither `node_id` nor any helper reached it: suspect it."""
        m = self.members.get(node_id)
        if m is not None and m.state == ALIVE:
            self._apply(News(SUSPECT, node_id, m.incarnation))

    def suspicion_timeout(self) -> float:
        n = 1 + sum(1 for m in self.members.values() if m.state in PROBE_STATES)
        p = self.params
        return p.suspicion_mult * max(1.0, math.log10(n)) * p.probe_interval

    def next_expiry(self) -> float | None:
        """When the first suspect's suspicion runs out (clock time), or None without suspects."""
        since = [m.since for m in self.members.values() if m.state == SUSPECT]
        return min(since) + self.suspicion_timeout() if since else None

    def tick(self) -> None:
        """Suspects past the suspicion timeout are dead; long-dead members are forgotten."""
        now = self.clock()
        timeout = self.suspicion_timeout()
        for n, m in list(self.members.items()):
            if m.state == SUSPECT and now - m.since >= timeout:
                self._apply(News(DEAD, n, m.incarnation))
            elif m.state in (DEAD, LEFT) and now - m.since >= self.params.reap_after:
                del self.members[n]
                self.version += 1

    # ------------------------------------------------------------------ messages

    def message(self, to: str | None = None, **extra: Any) -> dict[str, Any]:
        """A ping, ack or sync body for `to`: who we are, our epoch, piggybacked news (our view
        of `to` first when we do not hold it alive, so it can refute)."""
        news: list[News] = []
        m = self.members.get(to) if to else None
        if m is not None and m.state != ALIVE:
            news.append(News(m.state, m.node_id, m.incarnation, m.uri))
        n = sum(1 for x in self.members.values() if x.state in PROBE_STATES) + 1
        news += [x for x in self.queue.take(n, self.params.max_news - len(news)) if x not in news]
        news = [self._aged(x) for x in news]
        return {
            "from": self.self_id,
            "inc": self.incarnation,
            "uri": self.uri,
            "epoch": self.epoch,
            "news": [x.to_wire() for x in news],
            **extra,
        }

    def _aged(self, item: News) -> News:
        """A suspicion as sent: with how long this node has held it (when it still does)."""
        if item.kind != SUSPECT:
            return item
        m = self.members.get(item.node)
        if m is None or m.state != SUSPECT or m.incarnation != item.number:
            return item
        age = max(0, int((self.clock() - m.since) * 1000))
        return News(SUSPECT, item.node, item.number, item.uri, age_ms=age)

    def receive(self, msg: Message, trusted: bool) -> None:
        """Apply what a message says, when its sender is trusted (else nothing)."""
        if not trusted or msg.sender == self.self_id:
            return
        self._apply(News(ALIVE, msg.sender, msg.incarnation, msg.uri))
        self._apply(News(EPOCH, msg.sender, msg.epoch))
        for item in msg.news:
            self._apply(item)
        for item in msg.known:
            self._apply(item)
        for entry in msg.members:
            self._apply(entry)
            if entry.node != self.self_id and entry.kind != LEFT:
                epoch = msg.epochs.get(entry.node, -1)
                if epoch >= 0:
                    self._apply(News(EPOCH, entry.node, epoch))

    def digest(self, limit: int = 256) -> dict[str, Any]:
        """Anti-entropy body: the member list (a random sample when it is longer than `limit`)
        with each member's incarnation, state and catalog epoch, and a random sample of the
        generic items known (so an item that gossip missed somewhere arrives in the end)."""
        ms = list(self.members.values())
        if len(ms) > limit:
            ms = self.rng.sample(ms, limit)
        items = list(self.items.values())
        if len(items) > MAX_KNOWN:
            items = self.rng.sample(items, MAX_KNOWN)
        return {
            "members": [[m.node_id, m.uri, m.incarnation, m.state, m.epoch] for m in ms],
            "known": [x.to_wire() for x in items],
        }

    # ------------------------------------------------------------------ the rules

    def _apply(self, item: News) -> None:
        if item.kind == ITEM:
            old = self.items.get((item.topic, item.key))
            if item.node == self.self_id or (old is not None and item.number <= old.number):
                return
            if old is None and len(self.items) >= self.params.max_items:
                return
            self.items[(item.topic, item.key)] = item
            self.queue.add(item)
            self.events.append(("item", item.node, item))
            return
        if item.node == self.self_id:
            self._about_me(item)
            return
        m = self.members.get(item.node)
        if item.kind == EPOCH:
            if m is not None and item.number > m.epoch:
                m.epoch = item.number
                self.version += 1
                self.queue.add(item)
                self.events.append((EPOCH, item.node, item.number))
            return
        if m is None:
            # Only an alive item introduces a member; suspicion of a stranger means nothing here.
            if item.kind == ALIVE and len(self.members) < self.params.max_members:
                self.members[item.node] = Member(item.node, item.uri, item.number, ALIVE, self.clock())
                self.version += 1
                self.queue.add(item)
                self.events.append(("joined", item.node, item.uri))
            return
        if not newer(item, News(m.state, m.node_id, m.incarnation)):
            if item.kind == SUSPECT and m.state == SUSPECT and item.number == m.incarnation:
                m.since = min(m.since, self._suspected_since(item))  # someone suspected it earlier
            return
        was = m.state
        m.incarnation = item.number
        self.version += 1
        if item.kind == ALIVE and item.uri:
            m.uri = item.uri
        if item.kind != was:
            m.state = item.kind
            m.since = self._suspected_since(item) if item.kind == SUSPECT else self.clock()
            self.events.append((item.kind, item.node, was))
        self.queue.add(News(item.kind, item.node, item.number, m.uri if item.kind == ALIVE else ""))

    def _suspected_since(self, item: News) -> float:
        """When a suspicion began, by our clock: now less its age, the age capped at the
        suspicion timeout (a larger one says no more than "dead now", which a member may say)."""
        return self.clock() - min(item.age_ms / 1000, self.suspicion_timeout())

    def _about_me(self, item: News) -> None:
        claim = item.kind in MEMBER_KINDS and item.kind != ALIVE
        if claim and not self.leaving and item.number >= self.incarnation:
            # Suspected, or declared dead or gone, at our incarnation or later: refute.
            self.incarnation = item.number + 1
            self.refutations += 1
            self.version += 1
            self.queue.add(News(ALIVE, self.self_id, self.incarnation, self.uri))
            self.events.append(("refuted", self.self_id, item.kind))

    def snapshot(self) -> dict[str, Any]:
        return {
            "incarnation": self.incarnation,
            "refutations": self.refutations,
            "news_waiting": len(self.queue),
            "suspicion_timeout_s": round(self.suspicion_timeout(), 3),
            "members": [m.to_dict() for m in sorted(self.members.values(), key=lambda m: m.node_id)],
        }


__all__ = ["PROBE_STATES", "Event", "Member", "Swim", "SwimParams"]
