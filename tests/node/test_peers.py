"""The peer table's liveness logic, driven by a fake clock and scripted probe outcomes."""

from __future__ import annotations

from loraflight.federation.discovery import Announcement
from loraflight.federation.peers import DEPARTED_S, DROPPED, LIVE, PENDING, PeerInfo, PeerTable


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _table(events: list[tuple[str, str]], clock: Clock) -> PeerTable:
    return PeerTable(
        self_id="me",
        fleet="f",
        health_interval=1.0,
        probe_interval=5.0,
        failures=3,
        on_event=lambda ev, p: events.append((ev, p.key)),
        clock=clock,
    )


def _ann(node: str, epoch: int = 0, fleet: str = "f", uri: str = "grpc://10.0.0.2:1") -> Announcement:
    return Announcement(
        node, fleet, "1.0", False, epoch, (uri,), f"loraflight-{node}._loraflight._tcp.local."
    )


def test_announced_peer_dropped_after_failures_probed_and_back() -> None:
    clock, events = Clock(), []
    t = _table(events, clock)
    t.announce("added", _ann("p1"))
    assert [p.key for p in t.live()] == ["p1"]
    assert events == [("added", "p1")]
    for i in range(3):
        due = t.due()
        assert [p.key for p, _ in due] == ["p1"], i
        t.record(due[0][0], None, None, "timeout")
        clock.t += 1.0
    assert t.get("p1").state == DROPPED and t.live() == []
    assert events[-1] == ("dropped", "p1")
    # Dropped peers are probed at the probe interval, not the health interval.
    clock.t += 1.0
    assert t.due() == []
    clock.t += 5.0
    due = t.due()
    assert len(due) == 1
    t.record(due[0][0], "grpc://10.0.0.2:1", PeerInfo("p1", "f", 4))
    assert t.get("p1").state == LIVE and t.get("p1").epoch == 4
    assert events[-1] == ("back", "p1")


def test_epoch_change_in_txt_or_health_emits_epoch() -> None:
    clock, events = Clock(), []
    t = _table(events, clock)
    t.announce("added", _ann("p1", epoch=1))
    t.announce("updated", _ann("p1", epoch=2))
    assert events[-1] == ("epoch", "p1")
    t.announce("updated", _ann("p1", epoch=2))  # same epoch: nothing new
    assert events.count(("epoch", "p1")) == 1
    ((peer, uris),) = t.due()
    t.record(peer, uris[0], PeerInfo("p1", "f", 7))
    assert events[-1] == ("epoch", "p1") and events.count(("epoch", "p1")) == 2


def test_goodbye_removes_at_once_unless_static() -> None:
    clock, events = Clock(), []
    t = _table(events, clock)
    t.announce("added", _ann("p1"))
    t.announce("removed", _ann("p1"))
    assert t.all() == [] and events[-1] == ("removed", "p1")
    # A peer that is also a static peer stays after the goodbye.
    t.set_static("static", ["grpc://10.0.0.3:1"])
    ((peer, uris),) = t.due()
    assert peer.state == PENDING
    t.record(peer, uris[0], PeerInfo("p3", "f", 0))
    t.announce("added", _ann("p3", uri="grpc://10.0.0.3:1"))
    assert t.get("p3").sources == {"static", "mdns"}
    t.announce("removed", _ann("p3", uri="grpc://10.0.0.3:1"))
    assert t.get("p3") is not None and t.get("p3").sources == {"static"}


def test_a_notify_just_after_a_goodbye_does_not_bring_the_peer_back() -> None:
    """A notify the leaving node sent just before stopping can arrive after its mDNS goodbye."""
    clock, events = Clock(), []
    t = _table(events, clock)
    t.announce("added", _ann("p1"))
    t.announce("removed", _ann("p1"))
    assert t.all() == []
    clock.t += DEPARTED_S / 2
    assert t.add_address("notify", "grpc://10.0.0.2:1") is None and t.all() == []
    assert t.add_address("notify", "grpc://10.0.0.5:1") is not None  # another address: as before
    clock.t += DEPARTED_S
    assert t.add_address("notify", "grpc://10.0.0.2:1") is not None  # later: a new peer may be there
    t.announce("added", _ann("p1"))  # its own mDNS record brings a restarted peer back at once
    assert t.get("p1") is not None


def test_other_fleets_and_self_are_ignored() -> None:
    clock, events = Clock(), []
    t = _table(events, clock)
    t.announce("added", _ann("x", fleet="other"))
    t.announce("added", _ann("me"))
    assert t.all() == [] and events == []
    # A static URI that turns out to be another fleet is never live.
    t.set_static("static", ["grpc://10.0.0.9:1"])
    ((peer, uris),) = t.due()
    t.record(peer, uris[0], PeerInfo("x", "other", 3))
    assert t.live() == []


def test_static_and_mdns_entries_of_one_node_fold_into_one_peer() -> None:
    clock, events = Clock(), []
    t = _table(events, clock)
    t.announce("added", _ann("p1", uri="grpc://10.0.0.2:1"))
    t.set_static("dns:svc", ["grpc://10.0.0.20:1"])
    due = {p.key: (p, u) for p, u in t.due()}
    peer, uris = due["uri:grpc://10.0.0.20:1"]
    t.record(peer, uris[0], PeerInfo("p1", "f", 0))
    assert [p.key for p in t.all()] == ["p1"]
    assert set(t.get("p1").uris) == {"grpc://10.0.0.2:1", "grpc://10.0.0.20:1"}
    # The DNS name stops resolving to that address: the source leaves, the mDNS peer stays.
    t.set_static("dns:svc", [])
    assert t.get("p1") is not None and "dns:svc" not in t.get("p1").sources


def test_notify_addresses_that_never_answer_are_forgotten_static_ones_kept() -> None:
    events: list[tuple[str, str]] = []
    clock = Clock()
    t = _table(events, clock)
    t.set_static("static", ["grpc://10.0.0.9:1"])
    t.add_address("notify", "grpc://10.0.0.8:1")
    for _ in range(3):
        for peer, _uris in t.due():
            t.record(peer, None, None, "refused")
        clock.t += 1.0
    assert [p.uris for p in t.all()] == [["grpc://10.0.0.9:1"]]  # the notify-only one is gone
    assert t.all()[0].state == PENDING and events == []


def test_notify_flood_of_unknown_addresses_is_bounded() -> None:
    from loraflight.federation.peers import MAX_UNCONFIRMED

    t = _table([], Clock())
    for i in range(MAX_UNCONFIRMED + 50):
        t.add_address("notify", f"grpc://10.1.{i // 250}.{i % 250}:1")
    assert len(t.all()) == MAX_UNCONFIRMED
    t.set_static("static", ["grpc://10.0.0.9:1"])  # configured peers are never crowded out
    assert len(t.all()) == MAX_UNCONFIRMED + 1
    # a confirmed peer (it proved the fleet secret) frees its slot
    peer, uris = t.due()[0]
    t.record(peer, uris[0], PeerInfo("n1", "f", 0, proved="secret"))
    assert t.add_address("notify", "grpc://10.2.0.1:1") is not None
