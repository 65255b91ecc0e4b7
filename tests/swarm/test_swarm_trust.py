"""Who the swarm believes: a `have` naming an address this node does not sync from is dropped,
and such an address is never asked for pieces (issue 13's steering rule applied to issue 19)."""

from __future__ import annotations

from pathlib import Path

from loraflight.federation import Client
from loraflight.federation.node import Node
from loraflight.federation.swarm.wire import HaveItem
from loraflight.testing import node_config, wait_for

DIGEST = "ab" * 32


def _have(uri: str, peer: str) -> None:
    with Client(uri) as c:
        c.have(HaveItem(DIGEST, peer, frozenset({0}), 2))


def test_a_have_naming_an_unknown_or_notified_address_is_dropped(tmp_path: Path) -> None:
    with Node(node_config(tmp_path / "a", "f", **{"discovery.enabled": False})) as a:
        _have(a.uri, "grpc://127.0.0.1:9")  # nobody this node knows
        assert a.server is not None
        assert a.server.swarm.holders(DIGEST) == {}
        # variant: an address only a notify named (unconfirmed) is no better
        with Client(a.uri) as c:
            c.notify("grpc://127.0.0.2:9", 1)
        _have(a.uri, "grpc://127.0.0.2:9")
        assert a.server.swarm.holders(DIGEST) == {}
        assert not a.server.swarm.may_use("grpc://127.0.0.2:9")


def test_a_have_from_a_configured_live_peer_is_believed(tmp_path: Path) -> None:
    with Node(node_config(tmp_path / "b", "f", **{"discovery.enabled": False})) as b:
        cfg = node_config(tmp_path / "a", "f", **{"discovery.enabled": False, "discovery.peers": [b.uri]})
        with Node(cfg) as a:
            assert a.peers is not None and a.server is not None
            assert wait_for(lambda: a.peers.is_source(b.uri), timeout=10.0)
            _have(a.uri, b.uri)
            assert set(a.server.swarm.holders(DIGEST)) == {b.uri}
