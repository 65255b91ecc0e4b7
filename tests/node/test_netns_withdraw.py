"""Withdrawal across three hosts in network namespaces (scenario `withdraw_fleet` of
tests/node/netns_withdraw.py); skipped without root, like the other netns tests."""

from __future__ import annotations

from pathlib import Path

from tests.node.test_netns import pytestmark, run_scenario

__all__ = ["pytestmark"]


def test_withdrawal_reaches_every_host_despite_a_stale_peer_and_a_stopped_host(tmp_path: Path) -> None:
    out = run_scenario("withdraw_fleet", tmp_path)
    assert len(set(out["ids"].values())) == 3
    assert [w["name"] for w in out["withdrawals_h3"]] == ["skill"]
