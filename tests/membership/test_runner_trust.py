"""Whose gossip a node's membership believes: the peer table's one rule (`believes`), on the
server side of a call as on the caller's side."""

from __future__ import annotations

import json
import threading

from loraflight.federation.discovery import Announcement
from loraflight.federation.membership import ACTION_PING, LEFT, SUSPECT, Membership, News, SwimParams
from loraflight.federation.membership.settings import Settings
from loraflight.federation.peers import PeerInfo, PeerTable


def _table(open_fleet: bool) -> PeerTable:
    t = PeerTable(self_id="me", fleet="f", open_fleet=open_fleet)
    for node, ip in (("a", "10.9.0.2"), ("b", "10.9.0.3")):
        uri = f"grpc://{ip}:8815"
        t.announce("added", Announcement(node, "f", "1", False, 0, (uri,), f"{node}._lf._tcp.local."))
        peer = t.get(node) or t.find_uri(uri)
        assert peer is not None
        t.record(peer, uri, PeerInfo(node, "f", 0))
    return t


def _membership(table: PeerTable) -> Membership:
    def no_client(uri: str, timeout: float):  # these tests only answer calls; they make none
        raise AssertionError(f"no call expected ({uri})")

    m = Membership(
        Settings(SwimParams(probe_interval=1.0), 0.5, 10.0),
        self_id="me",
        fleet="f",
        peers=table,
        uri=lambda: "grpc://10.9.0.1:8815",
        epoch=0,
        client=no_client,
        stop=threading.Event(),
        incarnation=1,
    )
    m.swim.offer("b", "grpc://10.9.0.3:8815")
    return m


def _ping_from_a_saying_b_is_suspect() -> bytes:
    return json.dumps(
        {
            "from": "a",
            "inc": 5,
            "uri": "grpc://10.9.0.2:8815",
            "epoch": 0,
            "fleet": "f",
            "news": [News(SUSPECT, "b", 0).to_wire()],
        }
    ).encode()


def test_open_fleet_mdns_peer_is_believed_when_it_calls() -> None:
    m = _membership(_table(open_fleet=True))
    m.handle(ACTION_PING, _ping_from_a_saying_b_is_suspect(), caller="ipv4:10.9.0.2:40000")
    assert m.swim.members["b"].state == SUSPECT
    assert m.counts["ignored"] == 0


def test_with_a_fleet_secret_an_unconfirmed_mdns_peer_is_not_believed() -> None:
    m = _membership(_table(open_fleet=False))
    m.handle(ACTION_PING, _ping_from_a_saying_b_is_suspect(), caller="ipv4:10.9.0.2:40000")
    assert m.swim.members["b"].state != SUSPECT
    assert m.counts["ignored"] == 1


def test_a_believed_peer_calling_from_another_address_is_not_believed() -> None:
    m = _membership(_table(open_fleet=True))
    m.handle(ACTION_PING, _ping_from_a_saying_b_is_suspect(), caller="ipv4:10.9.0.66:40000")
    assert m.swim.members["b"].state != SUSPECT


def test_a_leaving_stranger_is_not_handed_to_the_peer_table() -> None:
    """After its mDNS goodbye a stopping node's last ping (carrying its own `left`) must not bring
    it back as a notify-learnt address."""
    table = _table(open_fleet=True)
    m = _membership(table)
    body = json.dumps(
        {
            "from": "z",
            "inc": 7,
            "uri": "grpc://10.9.0.9:8815",
            "epoch": 0,
            "fleet": "f",
            "news": [News(LEFT, "z", 7).to_wire()],
        }
    ).encode()
    m.handle(ACTION_PING, body, caller="ipv4:10.9.0.9:40000")
    assert table.find_uri("grpc://10.9.0.9:8815") is None
    body = json.dumps(
        {"from": "y", "inc": 1, "uri": "grpc://10.9.0.8:8815", "epoch": 0, "fleet": "f", "news": []}
    )
    m.handle(ACTION_PING, body.encode(), caller="ipv4:10.9.0.8:40000")
    assert table.find_uri("grpc://10.9.0.8:8815") is not None  # a stranger that stays is checked as before
