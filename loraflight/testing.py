"""Testing helpers for loraflight and the code built on it: small real cards, loopback node
configs, temp stores and Flight servers, bounded waits, test certificates, and the
network-namespace `Lab` (one node process per host).

The one home of these helpers: the test suite and the benchmarks import them from here.
Importing this module loads neither torch nor Flight; each helper imports what it needs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loraflight.engine.card import LoRACard, ModuleLoRA

if TYPE_CHECKING:
    from loraflight.federation.config import NodeConfig
    from loraflight.federation.server import CardServer
    from loraflight.federation.store import Store

TINY_BASE = "loraflight/tiny-encoder"


# ------------------------------------------------------------------ waiting


def wait_for(
    pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll `pred` until it returns something truthy (returned), at most `timeout` seconds;
    then raise AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_ports(n: int) -> list[int]:
    """`n` TCP ports on 127.0.0.1 that were free a moment ago (for nodes that must know each
    other's addresses before they start)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ------------------------------------------------------------------ cards


def make_card(
    name: str = "skill",
    version: int = 1,
    *,
    nbytes: int = 64 * 1024,
    modules: int = 2,
    seed: int = 0,
    key: Any = None,
    base_model: str | None = "tiny-base",
    tags: tuple[str, ...] = ("demo",),
    lineage: tuple[str, ...] = (),
) -> LoRACard:
    """A float32 card of about `nbytes` tensor bytes split over `modules` rows, signed by `key`."""
    rng = np.random.default_rng(seed + 1000 * version)
    rank = 4
    per = max(nbytes // modules // 4, 2 * rank)
    feat = max(per // (2 * rank), 1)
    mods = [
        ModuleLoRA(
            f"layers.{i}.proj",
            rank,
            8.0,
            rng.standard_normal((rank, feat), dtype=np.float32),
            rng.standard_normal((feat, rank), dtype=np.float32),
        )
        for i in range(modules)
    ]
    card = LoRACard.build(
        mods,
        name=name,
        version=version,
        description=f"{name} v{version}",
        tags=tags,
        base_model=base_model,
        created="2026-01-01T00:00:00Z",
        lineage=lineage,
    )
    return card.sign(key) if key is not None else card


def tiny_card(
    name: str = "skill",
    version: int = 1,
    *,
    key: Any = None,
    hidden: int = 64,
    layers: int = 2,
    rank: int = 4,
    seed: int = 0,
    base_model: str | None = TINY_BASE,
    pad_to_bytes: int = 0,
) -> LoRACard:
    """A card for `engine.authoring.models.tiny_encoder` (query/value of every layer), signed by `key`.

    `pad_to_bytes` raises the rank of the first module until the card holds about that many bytes
    of tensors (for transfer benchmarks; such a card still loads into the same model).
    """
    rng = np.random.default_rng(seed)
    mods = []
    targets = [f"encoder.layer.{i}.attention.self.{p}" for i in range(layers) for p in ("query", "value")]
    for t in targets:
        r = rank
        if pad_to_bytes and t == targets[0]:
            r = max(rank, pad_to_bytes // (4 * 2 * hidden))
        a = (rng.standard_normal((r, hidden)) * 0.05).astype(np.float32)
        b = (rng.standard_normal((hidden, r)) * 0.05).astype(np.float32)
        mods.append(ModuleLoRA(t, r, float(2 * r), a, b))
    card = LoRACard.build(
        mods, name=name, version=version, base_model=base_model, description=f"{name} test card"
    )
    return card.sign(key) if key is not None else card


def new_signer() -> tuple[Any, str]:
    """A fresh Ed25519 signing key and its public key in base64 (what `trust.keys` lists)."""
    from loraflight.engine import keys

    k = keys.generate()
    return k, keys.public_key_b64(k.public_key())


# ------------------------------------------------------------------ stores, servers, nodes


@contextlib.contextmanager
def store_factory(root: str | os.PathLike[str]) -> Iterator[Callable[..., Store]]:
    """`make(name="s", **kw)` opens `Store(root / name, **kw)`; every store is closed on exit."""
    from loraflight.federation.store import Store

    stores: list[Store] = []

    def make(name: str = "s", **kw: Any) -> Store:
        s = Store(Path(root) / name, **kw)
        stores.append(s)
        return s

    try:
        yield make
    finally:
        for s in stores:
            s.close()


@contextlib.contextmanager
def server_factory() -> Iterator[Callable[..., CardServer]]:
    """`make(store, **kw)` serves `store` on 127.0.0.1:0 (node id: the store folder's name);
    every server is stopped on exit."""
    from loraflight.federation.server import CardServer

    servers: list[CardServer] = []

    def make(store: Store, **kw: Any) -> CardServer:
        kw.setdefault("node_id", store.root.name)
        s = CardServer(store, **kw)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop(timeout=10)


def node_config(store: Path, fleet: str, **flags: Any) -> NodeConfig:
    """A validated loopback config with short intervals (flags use dotted keys)."""
    from loraflight.federation.config import load_config

    base = {
        "store": str(store),
        "listen": "grpc://127.0.0.1:0",
        "fleet": fleet,
        "discovery.interfaces": ["127.0.0.1"],
        "intervals.health": 0.5,
        "intervals.health_timeout": 1.0,
        "intervals.failures": 2,
        "intervals.probe": 0.5,
        "intervals.poll": 30.0,
    }
    base.update(flags)
    return load_config(env={}, flags=base)


# ------------------------------------------------------------------ certificates


def make_ca(tmp: Path, name: str = "ca") -> dict[str, Path]:
    """A CA plus a server cert for 127.0.0.1/localhost and a client cert; returns paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: Any, p: Path) -> None:
        p.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": tmp / f"{name}.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, server: bool) -> tuple[Path, Path]:
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        role = "server" if server else "client"
        cp, kp = tmp / f"{name}-{role}.crt", tmp / f"{name}-{role}.key"
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(k, kp)
        return cp, kp

    out["server_cert"], out["server_key"] = leaf("127.0.0.1", True)
    out["client_cert"], out["client_key"] = leaf("test client", False)
    return out


# ------------------------------------------------------------------ network-namespace lab

SUBNET = "10.77.0"
BRIDGE = "lfbr0"
PORT = 8815
TOKEN = "lab-write-token-0123456789"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (30 s at most), output captured."""
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


class Lab:
    """Hosts in network namespaces on one bridge, one `loraflight node run` each (see
    tests/node/netns_lab.py: run inside `unshare -n -m`)."""

    def __init__(self, workdir: Path, *, tmpfs_stores: bool = False) -> None:
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.hosts: list[int] = []
        self.exe = str(Path(sys.executable).with_name("loraflight"))
        # stores on a tmpfs (mounted by setup inside the lab's mount namespace), so one disk does
        # not stand in for every host's
        self.tmpfs_stores = tmpfs_stores
        self.stores_root = Path("/run/lfstores") if tmpfs_stores else workdir

    # -- network

    def setup(self) -> None:
        if os.environ.get("LORAFLIGHT_IN_LAB") != "1":
            raise SystemExit("netns_lab must run inside `unshare -n -m` (the test sets LORAFLIGHT_IN_LAB=1)")
        sh("mount", "--make-rprivate", "/")
        Path("/run/netns").mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "tmpfs", "/run/netns")
        if self.tmpfs_stores:
            self.stores_on_tmpfs()
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")

    def stores_on_tmpfs(self, root: Path = Path("/run/lfstores")) -> None:
        """Put the hosts' stores on a tmpfs from now on (inside the lab's mount namespace)."""
        root.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "tmpfs", str(root))
        self.tmpfs_stores, self.stores_root = True, root

    def add_host(self, i: int, *, rate: str | None = None) -> None:
        """Host `i` (namespace hN, eth0 = SUBNET.N on the bridge); `rate` shapes its uplink (`shape`)."""
        ns = f"h{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"lfv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", f"lfv{i}", "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts.append(i)
        if rate:
            self.shape(i, rate)

    def shape(self, i: int, rate: str = "200mbit", burst: str = "256kb", latency: str = "50ms") -> None:
        """Shape host `i`'s uplink (egress of its eth0) with a token bucket, as a real link would
        be: `tc qdisc replace dev eth0 root tbf rate RATE burst BURST latency LATENCY`."""
        sh("ip", "netns", "exec", f"h{i}", "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
           "rate", rate, "burst", burst, "latency", latency)  # fmt: skip

    def tx_bytes(self, i: int) -> int:
        """Bytes host `i` has sent on its eth0 (/sys/class/net/eth0/statistics/tx_bytes there)."""
        r = sh("ip", "netns", "exec", f"h{i}", "cat", "/sys/class/net/eth0/statistics/tx_bytes")
        return int(r.stdout.strip())

    def link(self, i: int, up: bool) -> None:
        sh("ip", "link", "set", f"lfv{i}", "up" if up else "down")

    # -- nodes

    def uri(self, i: int) -> str:
        return f"grpc://{SUBNET}.{i}:{PORT}"

    def store_dir(self, i: int) -> Path:
        return self.stores_root / f"h{i}" / "store"

    def status_path(self, i: int) -> Path:
        return self.workdir / f"h{i}" / "status.json"

    def start_node(self, i: int, fleet: str, *extra: str, engine: str = "tiny") -> None:
        d = self.workdir / f"h{i}"
        d.mkdir(parents=True, exist_ok=True)
        args = [
            "ip", "netns", "exec", f"h{i}", self.exe, "node", "run",
            "--store", str(self.store_dir(i)),
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


def sigkill_at_pause(proc: Any, marker: Path, what: str, timeout: float = 60.0) -> None:
    """Crash tests: wait (bounded) until the child `proc` (a multiprocessing.Process run with
    LORAFLIGHT_TEST_PAUSE) has written its pause point's `marker`, SIGKILL it there and reap it.
    AssertionError saying it never reached `what` when it ended or the wait ran out first."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.is_alive():
            if marker.exists() and marker.stat().st_size > 0:
                break
            time.sleep(0.02)
        if not marker.exists():
            raise AssertionError(f"the child never reached {what} (it ended with {proc.exitcode})")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    assert proc.exitcode == -signal.SIGKILL, f"the child ended with {proc.exitcode}, not SIGKILL"


__all__ = [
    "BRIDGE",
    "PORT",
    "SUBNET",
    "TINY_BASE",
    "TOKEN",
    "Lab",
    "free_ports",
    "make_ca",
    "make_card",
    "new_signer",
    "node_config",
    "server_factory",
    "sh",
    "sigkill_at_pause",
    "store_factory",
    "tiny_card",
    "wait_for",
]
