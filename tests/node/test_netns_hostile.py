"""Issue 13 from another host: a flooding neighbour and a spoofed mDNS record, in network
namespaces (tests/node/netns_hostile.py); skipped without root, like the other netns tests."""

from __future__ import annotations

from pathlib import Path

from tests.node.test_netns import pytestmark, run_scenario

__all__ = ["pytestmark"]


def test_a_flooding_neighbour_does_not_keep_a_real_peer_out(tmp_path: Path) -> None:
    out = run_scenario("flood_from_a_neighbour", tmp_path, timeout=300)
    assert out["sent"]["calls"] >= 500 and out["warnings"] <= 200


def test_a_spoofed_mdns_record_and_goodbye_leave_the_real_peer_alone(tmp_path: Path) -> None:
    out = run_scenario("mdns_spoof", tmp_path, timeout=300)
    assert out["h2_on_h1"]["state"] == "live"
