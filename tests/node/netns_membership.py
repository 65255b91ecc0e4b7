"""Membership churn on netns hosts (run by tests/node/test_netns_membership.py inside
``unshare -n -m``): a join mid-way, a wrongly suspected node under CPU load that refutes, a
SIGKILL and restart, a partition healed, and a gossiped address that is never a sync source.

    unshare -n -m .venv/bin/python -m tests.node.netns_membership WORKDIR

Nodes run without an engine (cards are checked in the store), SWIM periods of 0.3 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loraflight.testing import Lab, new_signer, tiny_card, wait_for

FLEET = "swim"
SWIM = (
    "--membership-probe-interval", "0.3",
    "--membership-suspicion-mult", "10",
    "--membership-sync-interval", "2",
)  # fmt: skip


def members(lab: Lab, i: int) -> dict[str, dict[str, Any]]:
    st = lab.status(i) or {}
    return {m["node_id"]: m for m in (st.get("membership") or {}).get("members", [])}


def incarnation(lab: Lab, i: int) -> int:
    return int(((lab.status(i) or {}).get("membership") or {}).get("incarnation", -1))


def all_alive(lab: Lab, ids: dict[int, str], hosts: list[int]) -> bool:
    for i in hosts:
        ms = members(lab, i)
        if any(ms.get(ids[j], {}).get("state") != "alive" for j in hosts if j != i):
            return False
    return True


def source_of(lab: Lab, i: int, ref: str) -> str | None:
    for c in (lab.status(i) or {}).get("cards", []):
        if c["ref"] == ref:
            return str(c.get("source") or "local")
    return None


T0 = time.monotonic()


def step(what: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - T0:6.1f} s] {what}\n")


def start(lab: Lab, i: int, pub: str, *extra: str) -> None:
    lab.start_node(i, FLEET, "--trust-key", pub, *SWIM, *extra, engine="")


def churn(lab: Lab) -> dict[str, Any]:
    key, pub = new_signer()
    for i in range(1, 7):
        lab.add_host(i)
    out: dict[str, Any] = {}
    # h6 has no mDNS: h1 names it as a static peer (confirmed there), everyone else hears of it
    # only from h1's gossip, so for them it is an unconfirmed, gossiped address.
    start(lab, 6, pub, "--no-discovery")
    ids = {6: lab.wait_up(6)["node_id"]}
    start(lab, 1, pub, "--peer", lab.uri(6))
    for i in (2, 3, 4):
        start(lab, i, pub)
    for i in (1, 2, 3, 4):
        ids[i] = lab.wait_up(i)["node_id"]
    core = [1, 2, 3, 4]
    wait_for(lambda: all_alive(lab, ids, core), 30, "h1..h4 to hold each other alive")

    step("1. a node joins mid-way")
    # 1. a node joins mid-way
    start(lab, 5, pub)
    ids[5] = lab.wait_up(5)["node_id"]
    core = [1, 2, 3, 4, 5]
    wait_for(lambda: all_alive(lab, ids, core), 30, "every table to take h5 in")
    lab.publish(1, tiny_card("one", 1, key=key))
    wait_for(lambda: all(lab.has_card(i, "one@1") for i in core), 30, "one@1 on every host")

    step("2. the gossiped")
    # 2. the gossiped address (h6) is no sync source: h6's card reaches the others through h1
    lab.publish(6, tiny_card("rogue", 1, key=key, seed=6))
    wait_for(lambda: all(lab.has_card(i, "rogue@1") for i in core), 40, "rogue@1 on every host")
    h6 = lab.uri(6)
    sources = {i: source_of(lab, i, "rogue@1") for i in core}
    out["rogue_sources"] = sources
    assert sources[1] == h6, f"h1, which configured h6, syncs from it: {sources}"
    bad = {i: src for i, src in sources.items() if i != 1 and src == h6}
    assert not bad, f"synced from the unconfirmed, gossiped h6: {sources}"
    for i in (2, 3, 4, 5):
        h6_peer = [p for p in (lab.status(i) or {}).get("peers", []) if p.get("node_id") == ids[6]]
        assert all("mdns" not in p["sources"] and "static" not in p["sources"] for p in h6_peer), h6_peer

    step("3. wrongly")
    # 3. wrongly suspected under CPU load: two busy loops, and h3 stopped for a moment
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        before = incarnation(lab, 3)
        os.kill(lab.procs[3].pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: any(
                    members(lab, i).get(ids[3], {}).get("state") == "suspect" for i in core if i != 3
                ),
                20,
                "someone to suspect the stopped h3",
            )
        finally:
            os.kill(lab.procs[3].pid, signal.SIGCONT)
        wait_for(lambda: incarnation(lab, 3) > before, 20, "h3 to refute (a higher incarnation)")
        wait_for(
            lambda: (
                all(members(lab, i).get(ids[3], {}).get("incarnation", -1) > before for i in core if i != 3)
                and all_alive(lab, ids, core)
            ),
            30,
            "every table to hold h3 alive at its new incarnation",
        )
    finally:
        for b in busy:
            b.kill()
            b.wait(10)
    out["refutations_h3"] = ((lab.status(3) or {}).get("membership") or {}).get("refutations")

    step("4. SIGKILL")
    # 4. SIGKILL h2: dead in every table; restarted, it rejoins above its old incarnation
    old = incarnation(lab, 2)
    lab.stop_node(2, signal.SIGKILL)
    rest = [1, 3, 4, 5]
    wait_for(
        lambda: (
            all(members(lab, i).get(ids[2], {}).get("state") == "dead" for i in rest)
            and all(ids[2] not in lab.live_peers(i) for i in rest)
        ),
        30,
        "the killed h2 to be dead in every table",
    )
    start(lab, 2, pub)
    wait_for(lambda: lab.status(2) and incarnation(lab, 2) > old, 30, "h2 to restart")
    wait_for(lambda: all_alive(lab, ids, core), 30, "every table to take the restarted h2 back")

    step("5. partition")
    # 5. partition: h4's link down; a card published meanwhile reaches it once the link is back
    lab.link(4, False)
    wait_for(
        lambda: all(members(lab, i).get(ids[4], {}).get("state") == "dead" for i in (1, 2, 3, 5)),
        30,
        "h4 to be dead on the other side of the partition",
    )
    lab.publish(1, tiny_card("two", 1, key=key, seed=2))
    wait_for(lambda: all(lab.has_card(i, "two@1") for i in (1, 2, 3, 5)), 30, "two@1 on the connected side")
    lab.link(4, True)
    wait_for(lambda: all_alive(lab, ids, core), 40, "every table to converge after the partition")
    wait_for(lambda: lab.has_card(4, "two@1"), 30, "h4 to catch up to two@1")

    step("done")
    out["ids"] = ids
    return out


def main(argv: list[str]) -> int:
    workdir = Path(argv[0])
    lab = Lab(workdir)
    t0 = time.monotonic()
    try:
        lab.setup()
        result = churn(lab)
    except BaseException:
        lab.dump()
        raise
    finally:
        lab.teardown()
    result["seconds"] = round(time.monotonic() - t0, 1)
    (workdir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
