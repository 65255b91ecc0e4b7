"""Scenarios for a lab of hosts in network namespaces joined by a bridge, one loraflight node per
host (`loraflight.testing.Lab`).

Run *inside* a private network and mount namespace (``unshare -n -m``), so every namespace,
veth and bridge it makes dies with it and nothing touches the machine's real network:

    unshare -n -m .venv/bin/python -m tests.node.netns_lab SCENARIO WORKDIR

Each host ``hN`` gets ``eth0`` = 10.77.0.N/24 on bridge ``lfbr0`` (10.77.0.254, which the lab
process itself uses to publish and to watch). Nodes run as ``ip netns exec hN loraflight node run``
with mDNS on ``eth0`` (real multicast over the veths), short intervals and a status file the lab
reads. The scenarios at the bottom are what tests/node/test_netns.py runs; each raises on failure
after dumping the nodes' status files and log tails.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraflight.testing import Lab, new_signer, tiny_card, wait_for

from .netns_hostile import flood_from_a_neighbour, mdns_spoof
from .netns_swarm import swarm_spread
from .netns_withdraw import withdraw_fleet


def _key() -> tuple[Any, str]:
    return new_signer()


def _card(name: str, version: int, key: Any, seed: int = 0) -> Any:
    return tiny_card(name, version, key=key, seed=seed)


# ------------------------------------------------------------------ scenarios


def three_hosts(lab: Lab) -> dict[str, Any]:
    """mDNS over veths; publish on h1 hot-loads on h2/h3; link flap; SIGTERM; SIGKILL + restart."""
    key, pub = _key()
    fleet = "lab"
    for i in (1, 2, 3):
        lab.add_host(i)
    for i in (1, 2, 3):
        lab.start_node(i, fleet, "--trust-key", pub)
    ids = {i: lab.wait_up(i)["node_id"] for i in (1, 2, 3)}
    for i in (1, 2, 3):
        others = {ids[j] for j in (1, 2, 3) if j != i}
        wait_for(lambda i=i, o=others: lab.mdns_peers(i) >= o, 60, f"h{i} to discover its peers over mDNS")
        assert (lab.status(i) or {}).get("mdns") is True, f"h{i} runs without mDNS"
    out: dict[str, Any] = {"ids": ids}

    # 1. publish on h1 -> hot-loaded on h2 and h3, no command on them
    t0 = time.monotonic()
    lab.publish(1, _card("skill", 1, key))
    wait_for(
        lambda: lab.loaded_version(2, "skill") == 1 and lab.loaded_version(3, "skill") == 1,
        60,
        "skill@1 on h2, h3",
    )
    out["propagation_s"] = time.monotonic() - t0

    # 2. h3's link down: v2 reaches h2 only; link up: h3 catches up by itself
    lab.link(3, False)
    wait_for(lambda: ids[3] not in lab.live_peers(1), 30, "h1 to drop h3 while its link is down")
    lab.publish(1, _card("skill", 2, key, seed=1))
    wait_for(lambda: lab.loaded_version(2, "skill") == 2, 60, "skill@2 on h2")
    assert lab.loaded_version(3, "skill") == 1, "h3 got v2 with its link down?"
    lab.link(3, True)
    wait_for(
        lambda: lab.loaded_version(3, "skill") == 2, 60, "h3 to catch up to skill@2 after its link came back"
    )
    wait_for(lambda: ids[3] in lab.live_peers(1), 30, "h1 to take h3 back")

    # 3. SIGTERM h2: exit 0, and it leaves h1's and h3's tables promptly (mDNS goodbye)
    rc = lab.stop_node(2, signal.SIGTERM)
    assert rc == 0, f"h2 exited with {rc} on SIGTERM"
    t0 = time.monotonic()
    wait_for(
        lambda: ids[2] not in lab.known_peers(1) and ids[2] not in lab.known_peers(3),
        10,
        "h2 to leave the tables",
    )
    out["sigterm_leave_s"] = time.monotonic() - t0

    # 4. SIGKILL h3: no goodbye; h1 drops it after failed health calls, takes it back on restart
    lab.stop_node(3, signal.SIGKILL)
    wait_for(lambda: ids[3] not in lab.live_peers(1), 30, "h1 to drop the killed h3")
    st1 = lab.status(1) or {}
    assert any(p["node_id"] == ids[3] and p["state"] == "dropped" for p in st1["peers"]), st1["peers"]
    lab.start_node(3, fleet, "--trust-key", pub)
    wait_for(lambda: ids[3] in lab.live_peers(1), 60, "h1 to take the restarted h3 back")
    assert lab.loaded_version(3, "skill") == 2, "the restarted h3 lost its loaded skill"
    return out


def static_peers(lab: Lab) -> dict[str, Any]:
    """Discovery off on both; h2 knows h1 as a static peer; a card published on h1 loads on h2.
    Both hold the fleet secret, so h1 confirms h2 from its hello and syncs from it too (an
    anonymous notify would not make h2 a sync source of h1)."""
    key, pub = _key()
    for i in (1, 2):
        lab.add_host(i)
    secret = lab.workdir / "fleet.secret"
    secret.write_text("st-fleet-secret-0123456789abcdef\n")
    lab.start_node(1, "st", "--trust-key", pub, "--no-discovery", "--fleet-secret-file", str(secret))
    lab.start_node(
        2,
        "st",
        "--trust-key",
        pub,
        "--no-discovery",
        "--peer",
        lab.uri(1),
        "--fleet-secret-file",
        str(secret),
    )
    ids = {i: lab.wait_up(i)["node_id"] for i in (1, 2)}
    wait_for(lambda: ids[1] in lab.live_peers(2) and ids[2] in lab.live_peers(1), 60, "static peers to meet")
    assert not (lab.status(1) or {}).get("mdns") and not (lab.status(2) or {}).get("mdns")
    lab.publish(1, _card("skill", 1, key))
    wait_for(lambda: lab.loaded_version(2, "skill") == 1, 60, "skill@1 on h2 over a static peer")
    # and back the other way: h1 confirmed h2 from its hello, so h2's cards flow to h1 as well
    lab.publish(2, _card("other", 1, key, seed=3))
    wait_for(lambda: lab.loaded_version(1, "other") == 1, 60, "other@1 on h1")
    return {"ids": ids}


def two_fleets(lab: Lab) -> dict[str, Any]:
    """Fleets A (h1, h2) and B (h3) share the link; nothing crosses between them."""
    key, pub = _key()
    for i in (1, 2, 3):
        lab.add_host(i)
    fast_poll = ("--intervals-poll", "1.0")
    lab.start_node(1, "fleet-a", "--trust-key", pub, *fast_poll)
    lab.start_node(2, "fleet-a", "--trust-key", pub, *fast_poll)
    lab.start_node(3, "fleet-b", "--trust-key", pub, *fast_poll)
    ids = {i: lab.wait_up(i)["node_id"] for i in (1, 2, 3)}
    wait_for(lambda: ids[2] in lab.live_peers(1) and ids[1] in lab.live_peers(2), 60, "fleet A to meet")
    lab.publish(1, _card("a-skill", 1, key))
    lab.publish(3, _card("b-skill", 1, key, seed=5))
    wait_for(lambda: lab.loaded_version(2, "a-skill") == 1, 60, "a-skill on h2")
    # Let three more safety-poll sync rounds run on h1 and h2 (poll = 1 s), then check nothing crossed.
    rounds = {i: (lab.status(i) or {}).get("sync_rounds", 0) for i in (1, 2)}
    wait_for(
        lambda: all((lab.status(i) or {}).get("sync_rounds", 0) >= rounds[i] + 3 for i in (1, 2)),
        60,
        "three more sync rounds on fleet A",
    )
    assert not lab.has_card(3, "a-skill@1"), "fleet B got fleet A's card"
    assert not lab.has_card(1, "b-skill@1") and not lab.has_card(2, "b-skill@1"), "fleet A got fleet B's card"
    assert ids[3] not in lab.known_peers(1) and ids[3] not in lab.known_peers(2), "fleet A lists h3"
    assert not lab.known_peers(3), f"fleet B's h3 lists peers: {lab.known_peers(3)}"
    return {"ids": ids}


SCENARIOS: dict[str, Callable[[Lab], dict[str, Any]]] = {
    "three_hosts": three_hosts,
    "static_peers": static_peers,
    "two_fleets": two_fleets,
    "withdraw_fleet": withdraw_fleet,
    "flood_from_a_neighbour": flood_from_a_neighbour,
    "mdns_spoof": mdns_spoof,
    "swarm_spread": swarm_spread,
}


def main(argv: list[str]) -> int:
    name, workdir = argv[0], Path(argv[1])
    lab = Lab(workdir)
    try:
        lab.setup()
        result = SCENARIOS[name](lab)
    except BaseException:
        lab.dump()
        raise
    finally:
        lab.teardown()
    (workdir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
