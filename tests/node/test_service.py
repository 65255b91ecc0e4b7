"""The node's Flight service runs on a `NodeView` alone: no `Node` behind it."""

from __future__ import annotations

from pathlib import Path

from loraflight.federation.client import node_action
from loraflight.federation.node import ACTION_PEERS, ACTION_STATUS, NodeServer, NodeView
from loraflight.federation.store import Store


def test_node_server_answers_status_and_peers_from_its_view(tmp_path: Path) -> None:
    peers = [{"node_id": "p1", "state": "live"}]
    view = NodeView(
        loaded=lambda: {"skill": {"version": 2, "digest": "d" * 64}},
        live_peers=lambda: len(peers),
        peers=lambda: peers,
        status=lambda: {"node_id": "me", "cards": []},
    )
    with Store(tmp_path / "s") as store:
        server = NodeServer(view, store, node_id="me")
        try:
            assert node_action(server.location, ACTION_STATUS) == {"node_id": "me", "cards": []}
            assert node_action(server.location, ACTION_PEERS) == peers
            info = node_action(server.location, "node-info")
            assert info["loaded"] == {"skill": {"version": 2, "digest": "d" * 64}} and info["peers"] == 1
        finally:
            server.stop(timeout=10)
