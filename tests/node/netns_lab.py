"""A lab of hosts in network namespaces joined by a bridge, one loraflight node per host.

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
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUBNET = "10.77.0"
BRIDGE = "lfbr0"
PORT = 8815
TOKEN = "lab-write-token-0123456789"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.hosts: list[int] = []
        self.exe = str(Path(sys.executable).with_name("loraflight"))

    # -- network

    def setup(self) -> None:
        if os.environ.get("LORAFLIGHT_IN_LAB") != "1":
            raise SystemExit("netns_lab must run inside `unshare -n -m` (the test sets LORAFLIGHT_IN_LAB=1)")
        sh("mount", "--make-rprivate", "/")
        Path("/run/netns").mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "tmpfs", "/run/netns")
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")

    def add_host(self, i: int) -> None:
        ns = f"h{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"lfv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", f"lfv{i}", "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts.append(i)

    def link(self, i: int, up: bool) -> None:
        sh("ip", "link", "set", f"lfv{i}", "up" if up else "down")

    # -- nodes

    def uri(self, i: int) -> str:
        return f"grpc://{SUBNET}.{i}:{PORT}"

    def status_path(self, i: int) -> Path:
        return self.workdir / f"h{i}" / "status.json"

    def start_node(self, i: int, fleet: str, *extra: str, engine: str = "tiny") -> None:
        d = self.workdir / f"h{i}"
        d.mkdir(parents=True, exist_ok=True)
        args = [
            "ip", "netns", "exec", f"h{i}", self.exe, "node", "run",
            "--store", str(d / "store"),
            "--listen", f"grpc://0.0.0.0:{PORT}",
            "--fleet", fleet,
            "--interface", "eth0",
            "--status-file", str(self.status_path(i)),
            "--write-token", TOKEN,
            "--intervals-health", "0.5",
            "--intervals-health-timeout", "1.0",
            "--intervals-failures", "2",
            "--intervals-probe", "1.0",
            "--intervals-poll", "30",
            "--log-level", "INFO",
        ]  # fmt: skip
        if engine:
            args += ["--engine-base-model", engine]
        args += list(extra)
        log = open(d / "node.log", "ab")  # noqa: SIM115 (the node process owns it)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.procs[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def wait_up(self, i: int, timeout: float = 60.0) -> dict[str, Any]:
        def up() -> dict[str, Any] | None:
            p = self.procs.get(i)
            if p is not None and p.poll() is not None:
                raise AssertionError(f"node h{i} exited with {p.returncode}")
            st = self.status(i)
            return st if st and st.get("node_id") else None

        return wait_for(up, timeout, f"node h{i} to start")

    def status(self, i: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path(i).read_text())
        except (OSError, ValueError):
            return None

    def live_peers(self, i: int) -> set[str]:
        st = self.status(i) or {}
        return {p["node_id"] for p in st.get("peers", []) if p["state"] == "live" and p.get("node_id")}

    def mdns_peers(self, i: int) -> set[str]:
        """Live peers this node has (also) seen announced over mDNS."""
        st = self.status(i) or {}
        return {p["node_id"] for p in st.get("peers", []) if p["state"] == "live" and "mdns" in p["sources"]}

    def known_peers(self, i: int) -> set[str]:
        st = self.status(i) or {}
        return {p["node_id"] for p in st.get("peers", []) if p.get("node_id")}

    def loaded_version(self, i: int, name: str) -> int | None:
        st = self.status(i) or {}
        v = st.get("loaded", {}).get(name)
        return v["version"] if v else None

    def has_card(self, i: int, ref: str) -> bool:
        st = self.status(i) or {}
        return any(c["ref"] == ref for c in st.get("cards", []))

    def stop_node(self, i: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        p = self.procs.pop(i)
        p.send_signal(sig)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            return None

    def publish(self, i: int, card: Any) -> str:
        from loraflight.federation.client import Client

        with Client(self.uri(i), token=TOKEN, timeout=10.0) as c:
            return str(c.publish(card))

    def teardown(self) -> None:
        for i in list(self.procs):
            p = self.procs.pop(i)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)

    def dump(self) -> None:
        for i in self.hosts:
            sys.stderr.write(f"--- h{i} status: {json.dumps(self.status(i), indent=1)[:3000]}\n")
            try:
                tail = (self.workdir / f"h{i}" / "node.log").read_text().splitlines()[-40:]
            except OSError:
                tail = []
            sys.stderr.write(f"--- h{i} log tail:\n" + "\n".join(tail) + "\n")


def _key() -> tuple[Any, str]:
    from loraflight.engine import keys

    k = keys.generate()
    return k, keys.public_key_b64(k.public_key())


def _card(name: str, version: int, key: Any, seed: int = 0) -> Any:
    from tests.node.helpers import tiny_card

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
    """Discovery off on both; h2 knows h1 as a static peer; a card published on h1 loads on h2."""
    key, pub = _key()
    for i in (1, 2):
        lab.add_host(i)
    lab.start_node(1, "st", "--trust-key", pub, "--no-discovery")
    lab.start_node(2, "st", "--trust-key", pub, "--no-discovery", "--peer", lab.uri(1))
    ids = {i: lab.wait_up(i)["node_id"] for i in (1, 2)}
    wait_for(lambda: ids[1] in lab.live_peers(2) and ids[2] in lab.live_peers(1), 60, "static peers to meet")
    assert not (lab.status(1) or {}).get("mdns") and not (lab.status(2) or {}).get("mdns")
    lab.publish(1, _card("skill", 1, key))
    wait_for(lambda: lab.loaded_version(2, "skill") == 1, 60, "skill@1 on h2 over a static peer")
    # and back the other way: h1 learnt h2 from its hello, so h2's cards flow to h1 as well
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
