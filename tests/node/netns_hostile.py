"""Hostile neighbours in network namespaces (issue 13, "Who is a peer"): a host on the same
LAN (h3, 10.77.0.3) floods a node with notifies and hellos, or spoofs a peer's mDNS record,
while the real peers (h1, h2) must go on as if it were not there. The real client and the
hostile one are told apart by their addresses, as a node tells them apart.

Scenarios (run by tests/node/test_netns_hostile.py through tests/node/netns_lab.py):
``flood_from_a_neighbour`` and ``mdns_spoof``. The hostile side runs as
``ip netns exec h3 python -m tests.node.netns_hostile flood|spoof ...``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from loraflight.testing import PORT, SUBNET, Lab, new_signer, tiny_card, wait_for

MAX_WARNINGS = 200  # warning lines a node may write for a whole flood (the issue saw 38,722 in 20 s)


def _hostile(lab: Lab, *args: str) -> subprocess.Popen[bytes]:
    log = open(lab.workdir / "hostile.log", "ab")  # noqa: SIM115 (the process owns it)
    cmd = ["ip", "netns", "exec", "h3", sys.executable, "-m", "tests.node.netns_hostile", *args]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    log.close()
    return p


def _warnings(lab: Lab, i: int) -> int:
    try:
        text = (lab.workdir / f"h{i}" / "node.log").read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if "WARNING" in line)


def flood_from_a_neighbour(lab: Lab) -> dict[str, Any]:
    """h3 floods h1 with notifies (URI variants, made-up hosts) and hellos (made-up proofs);
    h2, which holds the fleet secret and knows h1 from its config, starts during the flood:
    h1 confirms it from its hello and syncs its card; the flood costs few log lines."""
    key, pub = new_signer()
    secret = lab.workdir / "fleet.secret"
    secret.write_text("flood-fleet-secret-0123456789\n")
    for i in (1, 2, 3):
        lab.add_host(i)
    common = ("--trust-key", pub, "--no-discovery", "--fleet-secret-file", str(secret))
    lab.start_node(1, "fl", *common)
    id1 = lab.wait_up(1)["node_id"]
    marker = lab.workdir / "flood.started"
    stats = lab.workdir / "flood.json"
    stop = lab.workdir / "flood.stop"
    # it floods until told to stop (at most 120 s): through h2's start, its hello and its card
    flooder = _hostile(lab, "flood", lab.uri(1), "120", str(marker), str(stats), str(stop))
    try:
        wait_for(marker.exists, 30, "the flood to start")
        lab.start_node(2, "fl", *common, "--peer", lab.uri(1))
        id2 = lab.wait_up(2)["node_id"]

        def confirmed_on_h1() -> bool:
            st = lab.status(1) or {}
            return any(
                p["node_id"] == id2 and p["state"] == "live" and p.get("confirmed") for p in st["peers"]
            )

        wait_for(confirmed_on_h1, 60, "h1 to confirm h2 from its hello during the flood")
        during = flooder.poll() is None  # h3 was still flooding when h1 confirmed h2
        lab.publish(2, tiny_card("skill", 1, key=key))
        wait_for(lambda: lab.loaded_version(1, "skill") == 1, 60, "h2's card on h1 during the flood")
        assert during and flooder.poll() is None, "the flood ended before h1 confirmed h2: it proves nothing"
    finally:
        stop.write_text("stop")
        try:
            flooder.wait(60)
        except subprocess.TimeoutExpired:
            flooder.kill()
            flooder.wait(10)
    sent = json.loads(stats.read_text()) if stats.exists() else {}
    st1 = lab.status(1) or {}
    unconfirmed = [p for p in st1.get("peers", []) if not p.get("confirmed")]
    from loraflight.federation.peers import MAX_UNCONFIRMED

    assert sent.get("calls", 0) >= 500, f"the flood sent too little to mean anything: {sent}"
    assert len(unconfirmed) <= MAX_UNCONFIRMED, f"{len(unconfirmed)} unconfirmed peers on h1"
    warnings = _warnings(lab, 1)
    assert warnings <= MAX_WARNINGS, f"h1 wrote {warnings} warning lines for one flood"
    return {"ids": {1: id1, 2: id2}, "sent": sent, "warnings": warnings, "during": during}


def mdns_spoof(lab: Lab) -> dict[str, Any]:
    """h3 announces a record claiming h2's node id at its own address (an address change), then
    says goodbye for it; then announces a marker record. Once h1 has seen the marker, h2 is
    still live on h1 at its own address, and its next card still loads on h1."""
    key, pub = new_signer()
    for i in (1, 2, 3):
        lab.add_host(i)
    for i in (1, 2):
        lab.start_node(i, "sp", "--trust-key", pub)
    ids = {i: lab.wait_up(i)["node_id"] for i in (1, 2)}
    wait_for(lambda: ids[2] in lab.mdns_peers(1) and ids[1] in lab.mdns_peers(2), 60, "h1 and h2 to meet")
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    spoofer = _hostile(lab, "spoof", ids[2], "sp", marker)
    try:
        wait_for(lambda: marker in lab.known_peers(1), 60, "h1 to see the marker record after the goodbye")
    finally:
        try:
            spoofer.wait(60)
        except subprocess.TimeoutExpired:
            spoofer.kill()
            spoofer.wait(10)
    st = lab.status(1) or {}
    mine = [p for p in st.get("peers", []) if p.get("node_id") == ids[2]]
    assert mine, f"h1 forgot h2 after a spoofed goodbye: {st.get('peers')}"
    assert mine[0]["state"] == "live" and f"{SUBNET}.2:" in (mine[0]["uri"] or ""), mine[0]
    lab.publish(2, tiny_card("after-spoof", 1, key=key))
    wait_for(lambda: lab.loaded_version(1, "after-spoof") == 1, 60, "h2's card on h1 after the spoof")
    return {"ids": ids, "h2_on_h1": mine[0]}


# ------------------------------------------------------------------ the hostile host's side


def _flood(target: str, seconds: float, marker: str, stats: str, stop: str) -> int:
    """Notifies (URI variants of this host, made-up hosts) and hellos with made-up proofs, from
    three threads, until `stop` exists or `seconds` pass (plain pyarrow.flight calls)."""
    import secrets

    import pyarrow.flight as flight

    from loraflight.federation.security import call_headers

    counts = {"calls": 0, "refused": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    opts = flight.FlightCallOptions(timeout=2.0, headers=call_headers(None))

    def body(i: int, worker: int) -> tuple[str, dict[str, Any]]:
        if i % 3 == 0:
            return "hello", {
                "v": 1,
                "node_id": uuid.uuid4().hex,
                "peer": f"grpc://{SUBNET}.3:{PORT}",
                "target": target,
                "nonce": secrets.token_hex(16),
                "time": int(time.time()),
                "proof": secrets.token_hex(32),
            }
        if i % 3 == 1:
            return "notify", {"peer": f"grpc://{SUBNET}.3:{PORT}/{worker}/{i}/{uuid.uuid4().hex}", "epoch": i}
        return "notify", {"peer": f"grpc://10.{i % 250}.{worker}.{i % 200 + 1}:1", "epoch": i}

    def run(worker: int) -> None:
        c = flight.FlightClient(target)
        i = 0
        try:
            while time.monotonic() < deadline and not (i % 50 == 0 and Path(stop).exists()):
                i += 1
                kind, b = body(i, worker)
                try:
                    list(c.do_action(flight.Action(kind, json.dumps(b).encode()), opts))
                except flight.FlightError:
                    with lock:
                        counts["refused"] += 1
                with lock:
                    counts["calls"] += 1
                    if counts["calls"] == 100:
                        Path(marker).write_text("started")
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    Path(stats).write_text(json.dumps(counts))
    return 0


def _spoof(node_id: str, fleet: str, marker: str) -> int:
    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    from loraflight.federation.discovery import SERVICE_TYPE, txt_record

    me = f"{SUBNET}.3"
    zc = Zeroconf(interfaces=[me], ip_version=IPVersion.V4Only)

    def record(name: str, nid: str) -> ServiceInfo:
        props = txt_record(node_id=nid, fleet=fleet, proto="1.0", tls=False, epoch=99)
        return ServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(me)],
            port=PORT,
            properties=props,
            server=f"{name}.local.",
        )

    try:
        evil = record("loraflight-evil", node_id)  # claims the real peer's node id at our address
        zc.register_service(evil)
        time.sleep(3.0)  # resolved by the node: an "address change" for that id
        zc.unregister_service(evil)  # the goodbye
        time.sleep(1.0)
        mark = record(f"loraflight-{marker}", marker)
        zc.register_service(mark)
        time.sleep(8.0)
        zc.unregister_service(mark)
    finally:
        zc.close()
    return 0


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "flood":
        sys.exit(_flood(rest[0], float(rest[1]), rest[2], rest[3], rest[4]))
    sys.exit(_spoof(*rest))
