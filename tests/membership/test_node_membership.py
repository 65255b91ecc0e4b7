"""Membership on real nodes over loopback: SWIM instead of health calls, gossip-driven sync,
leaving, untrusted gossip ignored, bounded bodies, and a peer without the actions."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from loraflight.engine import keys
from loraflight.errors import LoraflightError
from loraflight.federation.membership import ACTION_PING, SwimClient
from loraflight.federation.node import Node
from loraflight.testing import free_ports, node_config, tiny_card, wait_for

FAST = {
    "discovery.enabled": False,
    "membership.probe_interval": 0.2,
    "membership.sync_interval": 1.0,
    "membership.suspicion_mult": 3.0,
}


def _members(node: Node) -> dict[str, dict[str, Any]]:
    snap = node.status().get("membership") or {}
    return {m["node_id"]: m for m in snap.get("members", [])}


@pytest.fixture
def signer() -> tuple[object, str]:
    k = keys.generate()
    return k, keys.public_key_b64(k.public_key())


def _mesh(tmp_path: Path, n: int, pub: str, **extra: Any) -> list[Node]:
    fleet = f"m{uuid.uuid4().hex[:8]}"
    ports = free_ports(n)
    uris = [f"grpc://127.0.0.1:{p}" for p in ports]
    nodes = []
    for i in range(n):
        cfg = node_config(
            tmp_path / f"n{i}",
            fleet,
            **{
                **FAST,
                "listen": uris[i],
                "discovery.peers": [u for j, u in enumerate(uris) if j != i],
                "trust.keys": [pub],
                **extra,
            },
        )
        nodes.append(Node(cfg).start())
    return nodes


def test_static_fleet_converges_syncs_by_gossip_and_sees_a_leave(tmp_path: Path, signer) -> None:
    key, pub = signer
    nodes = _mesh(tmp_path, 4, pub)
    try:
        ids = [n.node_id for n in nodes]
        wait_for(
            lambda: all(
                # incarnation > 0: heard from the member itself (the peer table offers it at 0)
                {i for i, m in _members(n).items() if m["state"] == "alive" and m["incarnation"] > 0}
                == set(ids) - {n.node_id}
                for n in nodes
            ),
            60,
            "every node to hold the three others alive at their own incarnations",
        )
        wait_for(
            lambda: all(n.membership is not None and n.membership.counts["acks"] > 0 for n in nodes),
            30,
            "every node to have had a ping answered",
        )
        entry = nodes[0].store.add(tiny_card("skill", 1, key=key), published=True)
        wait_for(lambda: all(entry.digest in n.store for n in nodes), 60, "skill@1 on every node")
        # the others heard n0's new epoch (ack, ping or gossip): their tables hold it
        wait_for(
            lambda: all(_members(n)[ids[0]]["epoch"] >= nodes[0].store.epoch for n in nodes[1:]),
            30,
            "n0's epoch in every table",
        )
        nodes[3].stop()
        wait_for(
            lambda: all(_members(n)[ids[3]]["state"] in ("left", "dead") for n in nodes[:3]),
            30,
            "n3 to be gone from every member table",
        )
        wait_for(
            lambda: all(ids[3] not in {p.node_id for p in n.peers.live()} for n in nodes[:3]),
            30,
            "n3 to be dropped from every peer table",
        )
    finally:
        for n in nodes:
            n.stop()


def test_gossip_from_an_unconfirmed_sender_is_ignored_and_bodies_are_bounded(tmp_path: Path, signer) -> None:
    _key, pub = signer
    nodes = _mesh(tmp_path, 2, pub)
    try:
        a, b = nodes
        wait_for(lambda: _members(a).get(b.node_id, {}).get("state") == "alive", 60, "a to hold b alive")
        lie = {
            "from": "stranger",
            "fleet": a.config.fleet,
            "inc": 1,
            "uri": "grpc://127.0.0.1:9",
            "epoch": 0,
            "news": [{"k": "dead", "n": b.node_id, "i": 2**40}],
        }
        with SwimClient(a.uri, timeout=5.0, retries=0) as c:
            answer = c.call(ACTION_PING, lie)
            assert answer["from"] == a.node_id
            with pytest.raises(LoraflightError, match="news"):
                c.call(ACTION_PING, {**lie, "news": [{"k": "epoch", "n": "x", "i": 1}] * 100})
            with pytest.raises(LoraflightError, match="limit"):
                c.call(ACTION_PING, {**lie, "pad": "x" * 70_000})
        assert _members(a)[b.node_id]["state"] == "alive"
        assert "stranger" not in _members(a)
        assert a.membership is not None and a.membership.counts["ignored"] >= 1
    finally:
        for n in nodes:
            n.stop()


def test_a_peer_without_membership_is_health_checked_and_syncs(tmp_path: Path, signer) -> None:
    key, pub = signer
    nodes = _mesh(tmp_path, 2, pub)
    old = nodes.pop()
    old.stop()
    cfg = node_config(
        tmp_path / "old",
        old.config.fleet,
        **{**FAST, "listen": old.config.listen, "discovery.peers": old.config.discovery.peers},
        **{"membership.enabled": False, "trust.keys": [pub]},
    )
    legacy = Node(cfg).start()
    new = nodes[0]
    try:
        wait_for(lambda: legacy.node_id in (new.membership.snapshot()["legacy_peers"]), 60, "legacy marked")
        wait_for(lambda: legacy.node_id in {p.node_id for p in new.peers.live()}, 60, "legacy live")
        entry = legacy.store.add(tiny_card("old-skill", 1, key=key), published=True)
        wait_for(lambda: entry.digest in new.store, 60, "the legacy node's card on the new one")
        assert "membership" not in legacy.status()
        assert json.dumps(new.status())  # the status stays JSON
    finally:
        new.stop()
        legacy.stop()


def test_a_node_keeps_one_connection_per_peer_for_its_pings(tmp_path: Path, signer) -> None:
    """SWIM pings, syncs and probes reuse the node's kept connections (federation/connections.py):
    after many pings each node has dialled each peer a few times at most, not once per ping."""
    _, pub = signer
    nodes = _mesh(tmp_path, 3, pub)
    try:
        wait_for(
            lambda: all(n.membership is not None and n.membership.counts["acks"] >= 20 for n in nodes),
            60,
            "every node to have had 20 pings answered",
        )
        for n in nodes:
            assert n.gate is not None and n.membership is not None
            # two peers, a control and a data connection each at most, plus a redial or two
            assert 1 <= n.gate.pool.dialled <= 6, (n.gate.pool.dialled, n.membership.counts)
    finally:
        for n in nodes:
            n.stop()
