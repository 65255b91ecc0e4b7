"""An in-process fleet of `Swim` tables on a simulated network with a fake clock.

Every message goes through its JSON form and `parse_message`, as over Flight. `down` nodes
answer nothing (killed or paused); `cut` pairs cannot reach each other (a partition).
"""

from __future__ import annotations

import json
import random
from typing import Any

from loraflight.federation.membership import Message, Swim, SwimParams, parse_message

__all__ = ["Clock", "Fleet"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _wire(body: dict[str, Any]) -> Message:
    return parse_message(json.dumps(body).encode())


class Fleet:
    def __init__(self, n: int, params: SwimParams | None = None, seed: int = 1) -> None:
        self.clock = Clock()
        self.params = params or SwimParams(probe_interval=1.0)
        self.rng = random.Random(seed)
        self.nodes: dict[str, Swim] = {}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()
        self.trusted = lambda sender, receiver: True
        self.periods = 0
        self.sync_every = 5  # anti-entropy every this many periods
        for i in range(n):
            self.add(f"n{i:02d}", incarnation=1)

    def add(self, node_id: str, incarnation: int) -> Swim:
        s = Swim(
            node_id,
            f"grpc://{node_id}:1",
            incarnation,
            self.params,
            clock=self.clock,
            rng=random.Random(self.rng.random()),
        )
        self.nodes[node_id] = s
        return s

    def introduce_all(self) -> None:
        """What each node's peer table offers: every other node (mDNS on one link)."""
        for a in self.nodes.values():
            for b in self.nodes.values():
                if a is not b and b.self_id not in self.down and self.reach(a.self_id, b.self_id):
                    a.offer(b.self_id, b.uri)

    def reach(self, a: str, b: str) -> bool:
        return b not in self.down and a not in self.down and frozenset((a, b)) not in self.cut

    def ping(self, a: Swim, b_id: str) -> bool:
        """a pings b: b applies a's message and answers; a applies the answer."""
        b = self.nodes.get(b_id)
        if b is None or not self.reach(a.self_id, b_id):
            return False
        b.receive(_wire(a.message(b_id)), self.trusted(a.self_id, b_id))
        ack = _wire(b.message(a.self_id))
        trusted = self.trusted(b_id, a.self_id)
        a.receive(ack, trusted)
        a.probe_ok(b_id, ack.incarnation if trusted else None, ack.epoch if trusted else None)
        return True

    def sync(self, a: Swim, b_id: str) -> None:
        """Anti-entropy between a and b (both ways)."""
        b = self.nodes.get(b_id)
        if b is None or not self.reach(a.self_id, b_id):
            return
        b.receive(_wire({**a.message(b_id), **a.digest()}), self.trusted(a.self_id, b_id))
        a.receive(_wire({**b.message(a.self_id), **b.digest()}), self.trusted(b_id, a.self_id))

    def period(self) -> None:
        self.periods += 1
        live = [s for s in self.nodes.values() if s.self_id not in self.down]
        for a in live:
            a.tick()
            targets = a.probe_targets()
            for t in targets:
                if self.ping(a, t):
                    continue
                helpers = a.helpers_for(t)
                reached = any(self.reach(a.self_id, h) and self.ping(self.nodes[h], t) for h in helpers)
                if reached:
                    a.probe_ok(t)
                else:
                    a.probe_failed(t)
            for t in a.gossip_targets(targets):
                self.ping(a, t)
            if self.periods % self.sync_every == 0 and (t := a.sync_target()):
                self.sync(a, t)
        self.clock.now += self.params.probe_interval

    def run(self, periods: int) -> None:
        for _ in range(periods):
            self.period()

    def run_until(self, cond: Any, max_periods: int) -> int:
        """Periods it took for `cond()` to hold (AssertionError past `max_periods`)."""
        for i in range(max_periods):
            if cond():
                return i
            self.period()
        assert cond(), f"not reached within {max_periods} periods"
        return max_periods

    def state(self, viewer: str, node: str) -> str | None:
        m = self.nodes[viewer].members.get(node)
        return m.state if m else None

    def others(self, node: str) -> list[Swim]:
        return [s for s in self.nodes.values() if s.self_id != node and s.self_id not in self.down]
