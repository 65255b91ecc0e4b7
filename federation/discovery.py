"""Zeroconf discovery: advertise this node as `_loraflight._tcp.local.` and browse for peers.

One long-lived `AsyncZeroconf` per node on its own asyncio loop thread. The TXT record carries
node id, fleet id, protocol version, TLS on/off and the catalog epoch; `update_epoch` sends a
service update so browsers see the change. Browser handlers never block the loop: they only
schedule a resolve task, and the peer callback they end in must be quick (the node's enqueues).

Liveness is *not* judged here (mDNS keeps records of a killed peer for ~20 minutes): the peer
table does Flight health calls. This module only reports what mDNS says: announced, updated,
said goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_TYPE = "_loraflight._tcp.local."
DISCOVERY_VERSION = "1"  # major version of the TXT record layout
MAX_TXT_ENTRY = 255  # RFC 6763 §6.1: each key=value string is at most 255 bytes
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000
_LOOP_TIMEOUT = 10.0  # bound on any wait for the loop thread
_GOODBYE_GRACE = 2.0  # seconds after a goodbye during which updates of that name are ignored
# Bounds against a LAN that announces service names without end (a hostile or broken host):
MAX_NAMES = 4096  # instance names tracked at once; events of further new names are dropped
MAX_RESOLVES = 256  # resolve tasks in flight at once


@dataclass(frozen=True)
class Announcement:
    """What one peer's mDNS record says."""

    node_id: str
    fleet: str
    proto: str  # the peer's Flight protocol version ("1" or "1.0")
    tls: bool
    epoch: int
    uris: tuple[str, ...]  # Flight addresses to try, best first
    instance: str  # the mDNS service instance name


def txt_record(
    *, node_id: str, fleet: str, proto: str, tls: bool, epoch: int, uri: str = ""
) -> dict[str, str]:
    """The TXT properties this node advertises; each entry is checked against the 255-byte limit."""
    props = {
        "v": DISCOVERY_VERSION,
        "id": node_id,
        "fleet": fleet,
        "proto": proto,
        "tls": "1" if tls else "0",
        "epoch": str(int(epoch)),
    }
    if uri:
        props["uri"] = uri
    for k, v in props.items():
        if len(k.encode()) + 1 + len(v.encode()) > MAX_TXT_ENTRY:
            raise ValueError(f"TXT entry {k!r} is longer than {MAX_TXT_ENTRY} bytes")
    return props


def parse_txt(
    props: dict[bytes, bytes | None] | dict[str, str | None],
    *,
    addresses: Iterable[str],
    port: int,
    instance: str,
) -> Announcement | None:
    """An `Announcement` from a resolved record, or None when it is not a usable loraflight TXT."""
    p: dict[str, str] = {}
    for k, v in props.items():
        ks = k.decode("utf-8", "replace") if isinstance(k, bytes) else k
        vs = v.decode("utf-8", "replace") if isinstance(v, bytes) else (v or "")
        p[ks] = vs
    node_id, fleet = p.get("id", ""), p.get("fleet", "")
    if not node_id or not fleet or p.get("v", DISCOVERY_VERSION).split(".")[0] != DISCOVERY_VERSION:
        return None
    try:
        epoch = int(p.get("epoch", "0"))
    except ValueError:
        epoch = 0
    tls = p.get("tls") == "1"
    scheme = "grpc+tls" if tls else "grpc"
    uris: list[str] = []
    if p.get("uri"):
        uris.append(p["uri"])
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.version == 6 and ip.is_link_local:
            continue  # would need a scope id the record does not carry
        host = f"[{a}]" if ip.version == 6 else a
        u = f"{scheme}://{host}:{port}"
        if u not in uris:
            uris.append(u)
    if not uris:
        return None
    return Announcement(node_id, fleet, p.get("proto", ""), tls, epoch, tuple(uris), instance)


def instance_name(node_id: str) -> str:
    """The mDNS instance label derived from the persistent node id (≤ 63 bytes)."""
    return f"loraflight-{node_id}"[:63]


# ------------------------------------------------------------------ interfaces


def _iface_flags(name: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{name}/flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return 0


def interface_addresses() -> dict[str, list[str]]:
    """IPv4 addresses of each network interface by name."""
    import ifaddr

    out: dict[str, list[str]] = {}
    for ad in ifaddr.get_adapters():
        ips = [str(ip.ip) for ip in ad.ips if isinstance(ip.ip, str)]
        if ips:
            out.setdefault(ad.nice_name, []).extend(ips)
    return out


def choose_interfaces(wanted: Iterable[str] = ()) -> list[str]:
    """IPv4 addresses mDNS should use.

    `wanted` names interfaces or gives addresses; empty means every interface that is up and
    can multicast, and loopback only when that is all there is.
    """
    addrs = interface_addresses()
    wanted = [w.strip() for w in wanted if w.strip()]
    if wanted:
        out: list[str] = []
        for w in wanted:
            try:
                ipaddress.ip_address(w)
                out.append(w)
                continue
            except ValueError:
                pass
            if w not in addrs:
                raise OSError(19, f"no interface named {w!r} with an IPv4 address (have: {', '.join(addrs)})")
            out.extend(addrs[w])
        return out
    chosen: list[str] = []
    loopback: list[str] = []
    for name, ips in addrs.items():
        flags = _iface_flags(name)
        if flags & _IFF_LOOPBACK or name == "lo":
            if flags & _IFF_UP or not flags:
                loopback.extend(ips)
        elif flags & _IFF_UP and flags & _IFF_MULTICAST:
            chosen.extend(ips)
    return chosen or [ip for ip in loopback if ip.startswith("127.")]


def resolve_dns(host: str, port: int, *, tls: bool = False) -> list[str]:
    """Flight URIs for every A/AAAA record of `host` (via the system resolver); [] when none."""
    scheme = "grpc+tls" if tls else "grpc"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        log.info("DNS peer %s did not resolve: %s", host, e)
        return []
    out: list[str] = []
    for family, _, _, _, sa in infos:
        ip = str(sa[0])
        u = f"{scheme}://[{ip}]:{port}" if family == socket.AF_INET6 else f"{scheme}://{ip}:{port}"
        if u not in out:
            out.append(u)
    return out


# ------------------------------------------------------------------ the service


PeerCallback = Callable[[str, Announcement], None]  # ("added" | "updated" | "removed", announcement)


class Discovery:
    """Advertise one node and browse for its fleet's peers on the chosen interfaces."""

    def __init__(
        self,
        *,
        node_id: str,
        fleet: str,
        port: int,
        proto: str,
        tls: bool = False,
        epoch: int = 0,
        interfaces: Iterable[str] = (),
        advertise: str = "",
        on_peer: PeerCallback | None = None,
    ) -> None:
        self.node_id = node_id
        self.fleet = fleet
        self.port = port
        self.proto = proto
        self.tls = tls
        self.advertise = advertise
        self._epoch = int(epoch)
        self._wanted = list(interfaces)
        self._on_peer = on_peer
        self.addresses: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._aiozc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._names: dict[str, str] = {}  # instance name -> node id
        # instance name -> the addresses its record named: a goodbye carries them, so the peer
        # table takes it only from the record that announced the peer (PeerTable.announce)
        self._uris: dict[str, tuple[str, ...]] = {}
        self._gen: dict[str, int] = {}  # instance name -> count of browser events seen
        self._removed_at: dict[str, float] = {}  # instance name -> loop time of its goodbye
        self._registered: asyncio.Future[Any] | None = None
        self._update_task: asyncio.Future[Any] | None = None
        self._broadcast: asyncio.Future[Any] | None = None
        self._update_again = False
        self.running = False

    # -- lifecycle (thread-safe wrappers around loop-only coroutines)

    def start(self) -> bool:
        """Start advertising and browsing; False (with a log line) when mDNS cannot run here."""
        try:
            self.addresses = choose_interfaces(self._wanted)
        except OSError as e:
            log.warning("mDNS disabled: %s; falling back to static and DNS peers", e)
            return False
        if not self.addresses:
            log.warning(
                "mDNS disabled: no up interface with an IPv4 address; falling back to static and DNS peers"
            )
            return False
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        t = threading.Thread(target=run, name=f"zeroconf-loop-{self.node_id[:8]}", daemon=True)
        t.start()
        ready.wait(_LOOP_TIMEOUT)
        self._loop, self._thread = loop, t
        try:
            self._call(self._async_start())
        except Exception as e:
            # Close whatever half-started (the Zeroconf sockets), whatever went wrong.
            with contextlib.suppress(Exception):
                self._call(self._async_stop())
            self._stop_loop()
            if not isinstance(e, OSError):
                raise
            log.warning(
                "mDNS unavailable on %s (%s); falling back to static and DNS peers",
                ",".join(self.addresses),
                e,
            )
            return False
        self.running = True
        log.info(
            "mDNS: advertising %s on %s, fleet %s",
            instance_name(self.node_id),
            ",".join(self.addresses),
            self.fleet,
        )
        return True

    def update_epoch(self, epoch: int) -> None:
        """Publish a new catalog epoch in the TXT record (a service update); never goes backwards."""
        if epoch <= self._epoch and self._info is not None:
            return
        self._epoch = int(epoch)
        if self.running and self._loop is not None:
            self._loop.call_soon_threadsafe(self._schedule_update)

    def stop(self) -> None:
        """Say goodbye (unregister), close Zeroconf and end the loop thread."""
        if self._loop is None:
            return
        if self.running:
            self.running = False
            try:
                self._call(self._async_stop())
            except Exception as e:  # shutting down: log, keep going
                log.warning("mDNS shutdown: %s", e)
        self._stop_loop()

    def __enter__(self) -> Discovery:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def epoch(self) -> int:
        return self._epoch

    def _call(self, coro: Any, timeout: float = _LOOP_TIMEOUT) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        loop, t = self._loop, self._thread
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if t is not None:
            t.join(_LOOP_TIMEOUT)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    # -- loop-only

    def _service_info(self) -> Any:
        from zeroconf.asyncio import AsyncServiceInfo

        props = txt_record(
            node_id=self.node_id,
            fleet=self.fleet,
            proto=self.proto,
            tls=self.tls,
            epoch=self._epoch,
            uri=self.advertise,
        )
        inst = instance_name(self.node_id)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{inst}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self.port,
            properties=props,
            server=f"{inst}.local.",
        )

    async def _async_start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self._aiozc = AsyncZeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        self._info = self._service_info()
        # The outer await schedules; the registration (probing, ~1.6 s) completes in the background.
        self._registered = await self._aiozc.async_register_service(self._info, cooperating_responders=True)
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def _schedule_update(self) -> None:
        """Coalesce epoch bumps: one update task at a time, re-run while bumps keep arriving."""
        self._update_again = True
        if self._update_task is None or self._update_task.done():
            self._update_task = asyncio.ensure_future(self._async_updates())

    async def _async_updates(self) -> None:
        for _ in range(1000):  # bounded: each round publishes the newest epoch
            if not self._update_again or self._aiozc is None or not self.running:
                return
            self._update_again = False
            try:
                await self._async_update()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("mDNS update failed: %s", e)

    async def _async_update(self) -> None:
        if self._aiozc is None:
            return
        if self._registered is not None:
            await asyncio.wait_for(asyncio.shield(self._registered), _LOOP_TIMEOUT)
        self._info = self._service_info()
        self._broadcast = await self._aiozc.async_update_service(self._info)
        await self._broadcast

    async def _async_stop(self) -> None:
        # Stop announcing first: an update still broadcasting after the goodbye would
        # re-announce this node to its peers.
        pending = [
            t for t in (self._update_task, self._broadcast, *self._tasks) if t is not None and not t.done()
        ]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_LOOP_TIMEOUT)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._aiozc is not None:
            if self._registered is not None and not self._registered.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._registered), _LOOP_TIMEOUT)
            with contextlib.suppress(Exception):
                await self._aiozc.async_unregister_all_services()
            await self._aiozc.async_close()
        self._aiozc = self._browser = None
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        if rest:
            await asyncio.wait(rest, timeout=_LOOP_TIMEOUT)

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        """Browser handler: runs on the loop; only schedules work."""
        from zeroconf import ServiceStateChange

        if name not in self._gen and len(self._gen) >= MAX_NAMES:
            self._prune_names()
            if len(self._gen) >= MAX_NAMES:
                log.debug("mDNS: tracking %d names already; ignoring %s", MAX_NAMES, name)
                return
        gen = self._gen[name] = self._gen.get(name, 0) + 1
        loop = asyncio.get_running_loop()
        if state_change is ServiceStateChange.Removed:
            self._removed_at[name] = loop.time()
            node_id = self._names.pop(name, None)
            uris = self._uris.pop(name, ())
            if node_id and node_id != self.node_id:
                self._emit("removed", Announcement(node_id, self.fleet, "", False, 0, uris, name))
            return
        added = state_change is ServiceStateChange.Added
        if not added and loop.time() - self._removed_at.get(name, float("-inf")) < _GOODBYE_GRACE:
            # The goodbye's own records (TTL 0, kept ~1 s in the cache) must not resurrect the peer.
            return
        if len(self._tasks) >= MAX_RESOLVES:
            log.debug("mDNS: %d resolves in flight; not resolving %s now", MAX_RESOLVES, name)
            return
        task = asyncio.ensure_future(self._resolve(name, added, gen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _prune_names(self) -> None:
        """Forget names that are neither known peers nor being resolved (loop only)."""
        now = asyncio.get_running_loop().time()
        for n in list(self._gen):
            if n not in self._names and now - self._removed_at.get(n, float("-inf")) >= _GOODBYE_GRACE:
                del self._gen[n]
                self._removed_at.pop(n, None)

    async def _resolve(self, name: str, added: bool, gen: int) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        if self._aiozc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._aiozc.zeroconf, 3000):
            log.debug("mDNS: could not resolve %s", name)
            return
        ann = parse_txt(
            info.properties or {},
            addresses=info.parsed_addresses(),
            port=info.port or 0,
            instance=name,
        )
        if ann is None or ann.node_id == self.node_id or self._gen.get(name) != gen:
            return  # not ours to report, or a newer event (a goodbye) overtook this resolve
        if ann.fleet != self.fleet:
            log.debug("mDNS: ignoring %s of fleet %s", ann.node_id, ann.fleet)
            return
        self._names[name] = ann.node_id
        self._uris[name] = ann.uris
        self._emit("added" if added else "updated", ann)

    def _emit(self, event: str, ann: Announcement) -> None:
        if self._on_peer is None:
            return
        try:
            self._on_peer(event, ann)
        except Exception:
            log.exception("peer callback failed for %s %s", event, ann.node_id)


def _log_failure(what: str) -> Callable[[Future[Any]], None]:
    def cb(fut: Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("%s failed: %s", what, fut.exception())

    return cb


__all__ = [
    "DISCOVERY_VERSION",
    "SERVICE_TYPE",
    "Announcement",
    "Discovery",
    "choose_interfaces",
    "instance_name",
    "interface_addresses",
    "parse_txt",
    "resolve_dns",
    "txt_record",
]
