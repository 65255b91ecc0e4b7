"""The `[swarm]` config table: checked with the rest of the config, turned into the swarm's
limits on a node, and a card published on a node notified to `swarm.notify` peers at once."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from loraflight.engine import keys
from loraflight.errors import ConfigError
from loraflight.federation.config import load_config
from loraflight.federation.node import Node
from loraflight.federation.swarm.settings import settings
from loraflight.testing import free_ports, node_config, wait_for

from .cards import pieced_card


def test_bad_swarm_keys_are_all_listed_with_their_ranges() -> None:
    bad = {
        "swarm.max_uploads": 0,
        "swarm.max_uploads_per_peer": 65,
        "swarm.fetch_concurrency": 0,
        "swarm.upload_wait": 7.0,
        "swarm.referral_wait": -1.0,
        "swarm.notify": 2000,
    }
    with pytest.raises(ConfigError) as e:
        load_config(env={}, flags=bad)
    text = str(e.value)
    assert "6 problems" in text, text
    for key in bad:
        assert key in text, (key, text)
    assert "well below a piece's 10 s deadline" in text
    with pytest.raises(ConfigError, match=r"swarm\.upload_wait"):  # the environment is checked too
        load_config(env={"LORAFLIGHT_SWARM_UPLOAD_WAIT": "9"})


def test_swarm_keys_become_the_limits_a_fetch_and_the_uploads_run_with() -> None:
    cfg = load_config(
        env={"LORAFLIGHT_SWARM_REFERRAL_WAIT": "0.5"},
        flags={
            "swarm.max_uploads": 3,
            "swarm.max_uploads_per_peer": 2,
            "swarm.upload_wait": 0.5,
            "swarm.fetch_concurrency": 6,
            "swarm.fetch_per_peer": 9,
            "swarm.notify": 0,
        },
    )
    s = settings(cfg)
    assert (s.limits.max_uploads, s.limits.max_uploads_per_peer, s.limits.upload_wait_s) == (3, 2, 0.5)
    sched = s.fetch.scheduler
    assert (sched.total, sched.per_peer, sched.referral_wait_s) == (6, 6, 0.5)  # per peer capped by total
    assert s.notify == 0
    d = settings(load_config(env={}))
    assert (d.limits.max_uploads, d.fetch.scheduler.total, d.notify) == (1, 4, 32)


def _notifies(node: Node) -> float:
    return node.metrics.registry.get_sample_value("loraflight_notifies_received_total") or 0.0


def test_a_swarm_card_published_on_a_node_is_notified_to_every_peer_at_once(tmp_path: Path) -> None:
    # membership notifies one peer of a change (fanout 1); a card the swarm spreads goes to all
    # (swarm.notify), so that no fetcher waits for gossip. Sync is off: the publish is the one change.
    key = keys.generate()
    pub = keys.public_key_b64(key.public_key())
    fleet = f"sw{uuid.uuid4().hex[:8]}"
    uris = [f"grpc://127.0.0.1:{p}" for p in free_ports(4)]
    nodes = []
    try:
        for i, uri in enumerate(uris):
            cfg = node_config(
                tmp_path / f"n{i}",
                fleet,
                **{
                    "listen": uri,
                    "discovery.enabled": False,
                    "discovery.peers": [u for u in uris if u != uri],
                    "trust.keys": [pub],
                    "sync.enabled": False,
                    "membership.fanout": 1,
                    "membership.probe_interval": 0.2,
                },
            )
            nodes.append(Node(cfg).start())
        wait_for(
            lambda: all(len(n.peers.live()) == 3 for n in nodes), 60, "every node to see the three others"
        )
        wait_for(lambda: all(n.wait_idle(1.0) for n in nodes), 30, "the nodes to be idle")
        before = [_notifies(n) for n in nodes]
        nodes[0].store.add(pieced_card(pieces=4, key=key), published=True)
        wait_for(
            lambda: all(_notifies(n) > b for n, b in zip(nodes[1:], before[1:], strict=True)),
            30,
            "a notify on every other node",
        )
    finally:
        for n in nodes:
            n.stop()
