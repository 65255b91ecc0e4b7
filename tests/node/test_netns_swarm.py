"""The swarm across 8 network-namespace hosts with shaped uplinks (tests/node/netns_swarm.py):
a card reaches every host although its origin leaves mid-spread, a joining and a restarted
node finish (the restarted one resumes from its kept pieces), and the origin sends at most 1.5 card sizes (its eth0's tx_bytes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .test_netns import _REASON, run_scenario

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.skipif(shutil.which("tc") is None, reason="`tc` (iproute2) is not installed"),
]


def test_swarm_spreads_from_every_host_when_the_origin_leaves(tmp_path: Path) -> None:
    out = run_scenario("swarm_spread", tmp_path, timeout=300)
    assert out["origin_tx_card_sizes"] <= 1.5
    assert out["b_done_when_origin_left"] < 7  # the origin left before the spread was over
    assert out["h7_resumed_pieces"] > 0  # h7, killed mid-fetch, did not start card C over
