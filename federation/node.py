"""A loraflight node: store + Flight server + discovery + peer table + sync loop + engine hot-load.

Theory of operation
-------------------
Threads, each with a bounded wait and joined on `stop()`:

* the Flight server (pyarrow's own threads) serving the store, plus two node actions,
  `peers` and `status`;
* the Zeroconf loop (`Discovery`), feeding mDNS events into the `PeerTable`;
* ``lf-peers``: health calls to live peers, probes of dropped ones, DNS re-resolution;
* ``lf-sync``: waits for a reason to sync — a `notify` from a peer, a higher catalog epoch
  in a peer's TXT or health answer, a new peer, or the slow safety poll — and pulls what
  the sync policy wants from those peers;
* ``lf-events``: reacts to every committed catalog change (published here or fetched):
  bumps the mDNS epoch, sends `notify` to live peers, exports the card as a PEFT folder,
  hot-loads it into the engine (base model and engine trust policy permitting; a newer
  version swaps in place), calls the user's callbacks, rewrites the status file.

News travels by `notify` first (milliseconds), mDNS epoch updates second (about a second),
and the safety poll last, so a lost message delays a card but never loses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loraflight.engine.card import LoRACard
from loraflight.errors import ConfigError, EngineError, LoraflightError, PeerError, TrustError

from .config import NodeConfig, parse_hostport, resolve_keys
from .discovery import Discovery, interface_addresses, resolve_dns
from .identity import NodeIdentity
from .metrics import NodeMetrics
from .peers import Peer, PeerInfo, PeerTable
from .protocol import PROTOCOL_VERSION, CatalogEntry
from .security import ClientTLS, ServerTLS
from .server import CardServer, _edge
from .store import Store
from .sync import SyncPolicy, sync

# addresses of one peer tried per probe, each for up to intervals.health_timeout
_PROBE_ADDRESSES = 4

log = logging.getLogger(__name__)

ACTION_PEERS = "peers"
ACTION_STATUS = "status"
_JOIN_TIMEOUT = 10.0

CardCallback = Callable[[CatalogEntry], None]


class NodeServer(CardServer):
    """The node's Flight service: the card protocol plus `peers` and `status` actions."""

    def __init__(self, node: Node, *args: Any, **kwargs: Any) -> None:
        self._node = node
        super().__init__(*args, **kwargs)

    def use_locations(self, locations: list[str]) -> None:
        """Addresses to advertise, once the bound port is known (listen on port 0)."""
        if locations:
            self._locations = list(locations)

    def node_info(self) -> dict[str, Any]:
        info = super().node_info()
        info["loaded"] = self._node.loaded()
        info["peers"] = len(self._node.peers.live()) if self._node.peers is not None else 0
        return info

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [
            *super().list_actions(context),
            (ACTION_PEERS, "the node's peer table: node id, address, state, sources, epoch"),
            (ACTION_STATUS, "node-info plus peers and adapters loaded into the engine"),
        ]

    @_edge  # errors become one Flight error with a message, never a traceback sent to the client
    def do_action(self, context: Any, action: Any) -> Any:
        if action.type == ACTION_PEERS:
            return iter(
                [json.dumps(self._node.peers.snapshot() if self._node.peers is not None else []).encode()]
            )
        if action.type == ACTION_STATUS:
            return iter([json.dumps(self._node.status()).encode()])
        return super().do_action(context, action)


class Node:
    """One loraflight node; `start()`/`stop()` or use as a context manager.

    `engine` (an `engine.Engine`) receives synced cards when `config.engine.hot_load` is on; with
    no engine given, one is built from `config.engine.base_model` when that is set. Callbacks get
    the `CatalogEntry`: `on_card_added` for every card that enters the store, `on_card_loaded`
    after a hot-load, `on_card_removed` when a card leaves the store.
    """

    def __init__(
        self,
        config: NodeConfig,
        engine: Any = None,
        *,
        on_card_added: CardCallback | None = None,
        on_card_loaded: CardCallback | None = None,
        on_card_removed: CardCallback | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.on_card_added = on_card_added
        self.on_card_loaded = on_card_loaded
        self.on_card_removed = on_card_removed
        self.metrics = NodeMetrics()
        self.store: Store | None = None
        self.server: NodeServer | None = None
        self.discovery: Discovery | None = None
        self.peers: PeerTable | None = None
        self.identity: NodeIdentity | None = None
        self.mdns = False
        self._engine_keys: list[str] = []
        self._client_tls: ClientTLS | None = None
        self._stop = threading.Event()
        self._sync_cv = threading.Condition()
        self._dirty: dict[str, str] = {}  # peer key -> reason
        self._wake_peers = threading.Event()
        self._events: queue.Queue[tuple[str, CatalogEntry] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self._loaded: dict[str, tuple[int, str]] = {}  # name -> (version, digest)
        self._load_lock = threading.Lock()
        self._engine_pins: set[str] = set()  # digests pinned because the engine holds them
        # children whose lineage parents have not reached the store yet: digest -> entry
        self._awaiting_parents: dict[str, CatalogEntry] = {}
        self._status_lock = threading.Lock()
        self._unsubscribe: Callable[[], None] | None = None
        self._started = False
        self._uri_of_peer: dict[str, str] = {}
        self.base_model_id: str | None = None
        self.sync_rounds = 0
        self._arrived: dict[str, float] = {}  # digest -> wall time it entered the store
        self._loaded_at: dict[str, float] = {}  # adapter name -> wall time of its last hot-load

    # ------------------------------------------------------------------ lifecycle

    @property
    def node_id(self) -> str:
        return self.identity.node_id if self.identity else ""

    @property
    def uri(self) -> str:
        assert self.server is not None, "node not started"
        return self.server.location

    @property
    def port(self) -> int:
        assert self.server is not None, "node not started"
        return int(self.server.port)

    def start(self) -> Node:
        if self._started:
            return self
        cfg = self.config
        try:
            self._start(cfg)
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def _start(self, cfg: NodeConfig) -> None:
        # A node may be started again after stop(): its loops must not see the old stop signal.
        self._stop.clear()
        self._wake_peers.clear()
        root = cfg.store_path
        self.identity = NodeIdentity.load_or_create(root / "identity")
        self.store = Store(root, max_bytes=cfg.store_max_bytes or None, trust=cfg.trust.entry)
        for k in resolve_keys(cfg.trust.keys):
            self.store.trust_add(k, label="config")
        self._engine_keys = resolve_keys(cfg.trust.engine_keys or cfg.trust.keys)
        tls = None
        if cfg.tls.cert:
            tls = ServerTLS.from_files(
                cfg.tls.cert, cfg.tls.key, cfg.tls.ca if cfg.tls.verify_client else None
            )
        if cfg.tls.ca or cfg.tls.client_cert:
            self._client_tls = ClientTLS.from_files(
                cfg.tls.ca or None, cfg.tls.client_cert or None, cfg.tls.client_key or None
            )
        if cfg.tokens.write and tls is None:
            log.warning("write tokens without TLS travel in clear text; configure tls.cert and tls.key")
        if self.engine is None and cfg.engine.base_model and cfg.engine.hot_load:
            self.engine = build_engine(cfg.engine.base_model, cfg.engine.device)
        if self.engine is not None:
            self.base_model_id = getattr(self.engine, "base_model", None)
        self.peers = PeerTable(
            self_id=self.identity.node_id,
            fleet=cfg.fleet,
            health_interval=cfg.intervals.health,
            probe_interval=cfg.intervals.probe,
            failures=cfg.intervals.failures,
            on_event=self._on_peer_event,
        )
        listen_port = urlsplit(cfg.listen).port or 0
        self.server = NodeServer(
            self,
            self.store,
            listen=cfg.listen,
            advertise=cfg.advertise or self._derive_locations(listen_port) or None,
            tls=tls,
            write_tokens=cfg.tokens.write,
            read_tokens=cfg.tokens.read,
            node_id=self.identity.node_id,
            fleet_id=cfg.fleet,
            on_notify=self._on_notify,
            peer_locations=self._peer_locations,
        )
        if not cfg.advertise and not listen_port:
            self.server.use_locations(self._derive_locations(self.server.port))
        if cfg.metrics.port >= 0:
            self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
        self._unsubscribe = self.store.subscribe(self._on_store_event)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"lf-io-{self.node_id[:6]}")
        if cfg.discovery.peers:
            self.peers.set_static("static", cfg.discovery.peers)
        if cfg.discovery.enabled:
            self.discovery = Discovery(
                node_id=self.identity.node_id,
                fleet=cfg.fleet,
                port=self.server.port,
                proto=PROTOCOL_VERSION,
                tls=tls is not None,
                epoch=self.store.epoch,
                interfaces=cfg.discovery.interfaces,
                advertise=cfg.advertise[0] if cfg.advertise else "",
                on_peer=self.peers.announce,
            )
            self.mdns = self.discovery.start()
            if not self.mdns:
                self.discovery = None
        self._hot_load_existing()
        for name, target in (
            ("peers", self._peers_loop),
            ("sync", self._sync_loop),
            ("events", self._events_loop),
        ):
            t = threading.Thread(target=target, name=f"lf-{name}-{self.node_id[:6]}", daemon=True)
            t.start()
            self._threads.append(t)
        self._update_gauges()
        self.write_status()
        log.info(
            "node %s up: fleet %s, serving %s, mDNS %s, %d static peers, %d DNS peers",
            self.node_id,
            cfg.fleet,
            ", ".join(self.server.locations),
            "on" if self.mdns else "off",
            len(cfg.discovery.peers),
            len(cfg.discovery.dns),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Unregister from mDNS (peers see the goodbye), stop loops, abort transfers, close."""
        self._stop.set()
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        with self._sync_cv:
            self._sync_cv.notify_all()
        self._wake_peers.set()
        self._events.put(None)
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.server is not None:
            self.server.stop(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.metrics.stop()
        if self.store is not None:
            self.store.close()
        self._started = False

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_forever(
        self, stop: threading.Event | None = None, on_ready: Callable[[Node], None] | None = None
    ) -> int:
        """Serve until SIGTERM/SIGINT (or `stop` is set); then shut down cleanly and return 0."""
        stop = stop or threading.Event()
        old: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            self.start()
            if on_ready is not None:
                on_ready(self)
            while not stop.wait(3600.0):
                pass
            log.info("node %s: stopping", self.node_id)
        finally:
            self.stop()
            for sig, h in old.items():
                signal.signal(sig, h)
        return 0

    # ------------------------------------------------------------------ addresses

    def _derive_locations(self, port: int) -> list[str]:
        """Advertised addresses when none are configured: the listen host, or every interface."""
        if not port:
            return []
        u = urlsplit(self.config.listen)
        scheme = "grpc+tls" if self.config.tls.cert else "grpc"
        host = u.hostname or ""
        if host not in ("0.0.0.0", "::", ""):
            h = f"[{host}]" if ":" in host else host
            return [f"{scheme}://{h}:{port}"]
        ips: list[str] = []
        wanted = set(self.config.discovery.interfaces)
        for name, addrs in interface_addresses().items():
            for ip in addrs:
                if ip.startswith("127."):
                    continue
                if wanted and name not in wanted and ip not in wanted:
                    continue
                ips.append(ip)
        return [f"{scheme}://{ip}:{port}" for ip in ips] or [f"{scheme}://127.0.0.1:{port}"]

    def _peer_locations(self, digest: str) -> list[str]:
        return []

    def _client(self, uri: str, timeout: float) -> Any:
        from .client import Client

        tls = self._client_tls if uri.startswith("grpc+tls") else None
        return Client(uri, self.config.tokens.peer or None, tls, timeout, retries=0)

    # ------------------------------------------------------------------ peers

    def _on_peer_event(self, event: str, peer: Peer) -> None:
        """Peer table events; may run on the mDNS loop, so nothing here blocks (no store I/O)."""
        if event in ("added", "back", "epoch"):
            self._mark_dirty(peer.key, event)
        if event in ("added", "dropped", "removed", "back"):
            log.info("peer %s %s (%s)", peer.key, event, peer.uri or ",".join(peer.uris))
            self._wake_peers.set()  # confirm a new peer with a health call at once
            self._in_pool(self._after_peer_change, peer if event in ("added", "back") else None)

    def _after_peer_change(self, hello_to: Peer | None) -> None:
        if hello_to is not None and self.store is not None:
            # Say hello: a peer that knows us only from our call learns our address too.
            self._notify_peers(self.store.epoch, [hello_to])
        self._update_gauges()
        self.write_status()

    def _in_pool(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is not None:
            with contextlib.suppress(RuntimeError):  # pool shut down while stopping
                self._pool.submit(fn, *args)

    def _on_notify(self, peer_uri: str) -> None:
        """A peer's catalog changed (Flight `notify`): sync from it now (runs on a server thread)."""
        self.metrics.notifies.inc()
        if self.peers is None:
            return
        peer = self.peers.find_uri(peer_uri)
        if peer is not None and peer.state == "live":
            self._mark_dirty(peer.key, "notify")
        else:
            # Unknown or not yet confirmed: a health call checks its fleet first, then it syncs.
            if peer is None:
                self.peers.add_address("notify", peer_uri)
            self._wake_peers.set()

    def _peers_loop(self) -> None:
        cfg = self.config
        tick = max(0.05, min(cfg.intervals.health, cfg.intervals.probe, 1.0) / 2)
        next_dns = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if cfg.discovery.dns and now >= next_dns:
                    next_dns = now + cfg.intervals.dns
                    self._resolve_dns_peers()
                self._check_peers()
                self._update_gauges()
            except Exception:  # one bad round must not end liveness checks for good
                log.exception("peer round failed; trying again next round")
            self._wake_peers.wait(tick)
            self._wake_peers.clear()

    def _resolve_dns_peers(self) -> None:
        assert self.peers is not None
        for entry in self.config.discovery.dns:
            hp = parse_hostport(entry, "discovery.dns", [])
            if hp is not None:
                own = self._own_uris()
                uris = [u for u in resolve_dns(*hp, tls=bool(self.config.tls.cert)) if u not in own]
                self.peers.set_static(f"dns:{entry}", uris)

    def _own_uris(self) -> set[str]:
        return set(self.server.locations) if self.server else set()

    def _check_peers(self) -> None:
        assert self.peers is not None and self._pool is not None
        due = self.peers.due()
        if not due:
            return
        timeout = self.config.intervals.health_timeout
        futs = {self._pool.submit(self._probe, uris, timeout): peer for peer, uris in due}
        done, _ = wait(futs, timeout=timeout * _PROBE_ADDRESSES + 1.0)
        for f, peer in futs.items():
            if f in done and f.exception() is None:
                uri, info, err = f.result()
            else:
                uri, info, err = None, None, "health call did not finish"
            if info is None:
                self.metrics.failures.labels("health").inc()
            self.peers.record(peer, uri, info, err)

    def _probe(self, uris: list[str], timeout: float) -> tuple[str | None, PeerInfo | None, str]:
        err = "no address"
        for uri in uris[:_PROBE_ADDRESSES]:
            if self._stop.is_set():
                return None, None, "stopping"
            try:
                with self._client(uri, timeout) as c:
                    h = c.health()
                return (
                    uri,
                    PeerInfo(
                        str(h.get("node_id", "")),
                        str(h.get("fleet_id", "")),
                        int(h.get("epoch", 0)),
                        str(h.get("protocol", "")),
                    ),
                    "",
                )
            except (LoraflightError, OSError, ValueError) as e:
                err = str(e)
        return None, None, err

    # ------------------------------------------------------------------ sync

    def _mark_dirty(self, key: str, reason: str) -> None:
        with self._sync_cv:
            self._dirty.setdefault(key, reason)
            self._sync_cv.notify_all()

    def _sync_loop(self) -> None:
        poll = self.config.intervals.poll
        next_poll = time.monotonic() + poll
        while not self._stop.is_set():
            with self._sync_cv:
                while not self._dirty and not self._stop.is_set():
                    left = next_poll - time.monotonic()
                    if left <= 0:
                        break
                    self._sync_cv.wait(min(left, 5.0))
                dirty, self._dirty = self._dirty, {}
            if self._stop.is_set():
                return
            if not dirty:
                next_poll = time.monotonic() + poll
                dirty = {p.key: "poll" for p in (self.peers.live() if self.peers is not None else [])}
            if not dirty or not self.config.sync.enabled:
                continue
            try:
                self.sync_now(list(dirty), trigger=next(iter(dirty.values())))
            except Exception:  # e.g. the index is locked or the disk failed: the next round retries
                log.exception("sync round failed; the next trigger or poll retries")
                self.metrics.failures.labels("sync").inc()

    def sync_now(self, peer_keys: Iterable[str] | None = None, trigger: str = "manual") -> list[CatalogEntry]:
        """Pull what the sync policy wants from these live peers (all when None); returns new entries."""
        assert self.peers is not None and self.store is not None
        live = {p.key: p for p in self.peers.live()}
        peers = list(live.values()) if peer_keys is None else [live[k] for k in peer_keys if k in live]
        if not peers:
            return []
        self.metrics.syncs.labels(trigger).inc()
        self.sync_rounds += 1
        t0 = time.perf_counter()
        added: list[CatalogEntry] = []
        try:
            added = self._sync_from(peers)
        finally:
            self.metrics.sync_seconds.observe(time.perf_counter() - t0)
            self.write_status()
        return added

    def _sync_from(self, peers: list[Peer]) -> list[CatalogEntry]:
        """List the peers, plan with the sync policy, fetch (bounded concurrency, verified)."""
        assert self.store is not None
        pol = self.config.sync
        report = sync(
            [p.uri or p.uris[0] for p in peers],
            SyncPolicy(base_models=tuple(pol.base_models), tags=tuple(pol.tags), names=tuple(pol.names)),
            self.store,
            concurrency=pol.concurrency,
            token=self.config.tokens.peer or None,
            tls=self._client_tls,
            timeout=max(self.config.intervals.health_timeout, 5.0),
        )
        for e in report.fetched:
            self.metrics.fetches.inc()
            self.metrics.fetched_bytes.inc(e.size)
        for ref, err in report.errors.items():
            self.metrics.failures.labels("fetch").inc()
            log.warning("sync: %s failed: %s", ref, err)
        for uri, err in report.peer_errors.items():
            self.metrics.failures.labels("list").inc()
            log.info("sync: listing %s failed: %s", uri, err)
        return list(report.fetched)

    # ------------------------------------------------------------------ catalog changes

    def _on_store_event(self, event: str, entry: CatalogEntry) -> None:
        """Runs in the thread that committed the change: send the news now, do the rest later."""
        if event == "added":
            self._arrived[entry.digest] = time.time()
        if self.store is not None and not self._stop.is_set():
            epoch = self.store.epoch
            if self.discovery is not None:
                self.discovery.update_epoch(epoch)  # non-blocking: runs on the mDNS loop
            self._notify_peers(epoch)  # non-blocking: runs on the I/O pool
        self._events.put((event, entry))

    def _events_loop(self) -> None:
        while True:
            try:
                item = self._events.get(timeout=1.0)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                if item is None:
                    return
                event, entry = item
                try:
                    self._handle(event, entry)
                except Exception:
                    log.exception("handling %s %s failed", event, entry.ref)
            finally:
                self._events.task_done()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every catalog change so far is handled (loaded, exported, called back)."""
        deadline = time.monotonic() + timeout
        with self._events.all_tasks_done:
            while self._events.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._events.all_tasks_done.wait(left)
        return True

    def _handle(self, event: str, entry: CatalogEntry) -> None:
        assert self.store is not None
        self._update_gauges()
        if event == "added":
            log.info("card %s (%s…) added from %s", entry.ref, entry.digest[:12], entry.source or "local")
            self._callback(self.on_card_added, entry)
            self._hot_load(entry)
            self._export(entry)
            self._retry_awaiting_parents()
        elif event == "removed":
            log.info("card %s removed", entry.ref)
            self._unload(entry)
            self._unexport(entry)
            self._callback(self.on_card_removed, entry)
        self.write_status()

    def _notify_peers(self, epoch: int, peers: list[Peer] | None = None) -> None:
        if self.peers is None or self._pool is None or self.server is None:
            return
        me = self.server.location
        timeout = self.config.intervals.health_timeout

        def send(peer: Peer) -> None:
            uri = peer.uri or peer.uris[0]
            try:
                with self._client(uri, timeout) as c:
                    c.notify(me, epoch)
            except (LoraflightError, OSError) as e:
                log.debug("notify %s failed: %s", uri, e)
                self.metrics.failures.labels("notify").inc()

        for peer in self.peers.live() if peers is None else peers:
            with contextlib.suppress(RuntimeError):  # pool shut down while stopping
                self._pool.submit(send, peer)

    def _callback(self, cb: CardCallback | None, entry: CatalogEntry) -> None:
        if cb is None:
            return
        try:
            cb(entry)
        except Exception:
            log.exception("user callback %r failed for %s", cb, entry.ref)

    # ------------------------------------------------------------------ engine

    def loaded(self) -> dict[str, dict[str, Any]]:
        """Adapters this node loaded into its engine: name -> version, digest."""
        with self._load_lock:
            return {n: {"version": v, "digest": d} for n, (v, d) in sorted(self._loaded.items())}

    def _hot_load_existing(self) -> None:
        if self.engine is None or not self.config.engine.hot_load or self.store is None:
            return
        newest: dict[str, CatalogEntry] = {}
        for e in self.store.list():
            if e.name not in newest or e.version > newest[e.name].version:
                newest[e.name] = e
        for e in newest.values():
            self._hot_load(e)

    def _engine_refusal(self, entry: CatalogEntry) -> str | None:
        """Why this card must not reach the engine (None: it may)."""
        h = entry.header
        if self.base_model_id and h.base_model and h.base_model != self.base_model_id:
            return f"it is for base model {h.base_model}, the engine runs {self.base_model_id}"
        why = self._trust_refusal(entry)
        if why:
            return why
        cur = self._loaded.get(h.name)
        if cur is not None and cur[0] >= h.version:
            return f"version {cur[0]} of {h.name} is already loaded"
        return None

    def _trust_refusal(self, entry: CatalogEntry) -> str | None:
        """Why trust.engine forbids serving this card, hot-loaded or exported (None: allowed).

        The store checked any signature on entry; this checks whose it is.
        """
        h = entry.header
        if self.config.trust.engine == "signed":
            if not h.signature:
                return "it is unsigned and trust.engine is 'signed'"
            if h.signer_key not in self._engine_keys:
                return f"its signer {h.signer} is not among the keys trusted for the engine"
        return None

    def _hot_load(self, entry: CatalogEntry) -> None:
        if self.engine is None or not self.config.engine.hot_load or self.store is None:
            return
        with self._load_lock:
            why = self._engine_refusal(entry)
            if why:
                log.info("not loading %s: %s", entry.ref, why)
                return
            store = self.store
            missing = [d for d in entry.header.lineage if not store.entry_exists(d)]
            if missing:
                # The sync planner fetches parents with their child, but they may commit after
                # it: load the child once every parent is in the store.
                log.info("%s waits for lineage parent(s) %s", entry.ref, ", ".join(d[:12] for d in missing))
                self._awaiting_parents[entry.digest] = entry
                return
            self._awaiting_parents.pop(entry.digest, None)
            t0 = time.perf_counter()
            try:
                card = LoRACard.open(store.path_of(entry.digest))
                trust = self._engine_keys if self.config.trust.engine == "signed" else None
                self.engine.load(
                    card,
                    trust=trust,
                    resolver=lambda d: store.path_of(d) if store.entry_exists(d) else None,
                )
                self._loaded[entry.name] = (entry.version, entry.digest)
                self._loaded_at[entry.name] = time.time()
                self._repin()
            except (EngineError, TrustError) as e:
                log.warning("not loading %s: %s", entry.ref, e)
                self.metrics.failures.labels("load").inc()
                return
            except LoraflightError as e:
                log.error("loading %s failed: %s", entry.ref, e)
                self.metrics.failures.labels("load").inc()
                return
            dt = time.perf_counter() - t0
        self.metrics.load_seconds.observe(dt)
        log.info("hot-loaded %s in %.1f ms", entry.ref, dt * 1000)
        self._update_gauges()
        self._callback(self.on_card_loaded, entry)

    def _retry_awaiting_parents(self) -> None:
        """Load children that were waiting for a lineage parent now in the store."""
        if not self._awaiting_parents or self.store is None:
            return
        for entry in list(self._awaiting_parents.values()):
            if all(self.store.entry_exists(d) for d in entry.header.lineage):
                self._hot_load(entry)

    def _unload(self, entry: CatalogEntry) -> None:
        self._awaiting_parents.pop(entry.digest, None)
        if self.engine is None:
            return
        with self._load_lock:
            cur = self._loaded.get(entry.name)
            if cur is None or cur[1] != entry.digest:
                return
            try:
                self.engine.unload(entry.name)
            except LoraflightError as e:
                log.warning("unloading %s: %s", entry.ref, e)
            del self._loaded[entry.name]
            self._repin()

    def _repin(self) -> None:
        """Pin what the engine holds: every loaded card and its lineage ancestors (never evicted).

        Unpins what this node pinned before and no longer needs (a swapped-out version). Parents
        loaded through a child's lineage are pinned too, so eviction cannot take a file a loaded
        child needs again after a restart. Caller holds `_load_lock`.
        """
        store = self.store
        if store is None:
            return
        need: set[str] = set()
        todo = [d for _, d in self._loaded.values()]
        for _ in range(100_000):  # bounded: each digest is expanded once
            if not todo:
                break
            d = todo.pop()
            if d in need:
                continue
            need.add(d)
            e = store.entry(d)
            if e is not None:
                todo.extend(e.header.lineage)
        for d in need - self._engine_pins:
            with contextlib.suppress(LoraflightError):
                store.pin(d)
        for d in self._engine_pins - need:
            with contextlib.suppress(LoraflightError):
                store.unpin(d)
        self._engine_pins = need

    # ------------------------------------------------------------------ export

    def _export(self, entry: CatalogEntry) -> None:
        """Write the card as a PEFT folder `<export_dir>/<name>-v<version>` (atomic rename)."""
        if not self.config.export_dir or self.store is None:
            return
        why = self._trust_refusal(entry)  # an exported folder is served too (vLLM, LoRAX)
        if why:
            log.info("not exporting %s: %s", entry.ref, why)
            return
        root = Path(os.path.expanduser(self.config.export_dir))
        final = root / f"{entry.name}-v{entry.version}"
        if final.exists():
            return
        tmp = root / f".tmp-{entry.digest[:16]}"
        try:
            from loraflight.engine.peft_io import to_peft

            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            to_peft(LoRACard.open(self.store.path_of(entry.digest)), tmp)
            os.replace(tmp, final)
            log.info("exported %s to %s", entry.ref, final)
        except (LoraflightError, OSError, ImportError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("exporting %s as a PEFT folder failed: %s", entry.ref, e)
            self.metrics.failures.labels("export").inc()

    def _unexport(self, entry: CatalogEntry) -> None:
        if self.config.export_dir:
            d = Path(os.path.expanduser(self.config.export_dir)) / f"{entry.name}-v{entry.version}"
            shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What `loraflight status` shows and the status file holds."""
        st = self.store.stats() if self.store is not None else {}
        return {
            "node_id": self.node_id,
            "fleet_id": self.config.fleet,
            "protocol": PROTOCOL_VERSION,
            "uris": self.server.locations if self.server else [],
            "epoch": self.store.epoch if self.store is not None else 0,
            "mdns": self.mdns,
            "cards": [
                {
                    "ref": e.ref,
                    "digest": e.digest,
                    "size": e.size,
                    "source": e.source,
                    "at": self._arrived.get(e.digest),
                }
                for e in (self.store.list() if self.store is not None else [])
            ],
            "stats": st,
            "loaded": {n: {**v, "at": self._loaded_at.get(n)} for n, v in self.loaded().items()},
            "base_model": self.base_model_id,
            "peers": self.peers.snapshot() if self.peers is not None else [],
            "sync_rounds": self.sync_rounds,
            "time": time.time(),
        }

    def write_status(self) -> None:
        """Atomically rewrite the status file (when configured)."""
        if not self.config.status_file or self.store is None:
            return
        path = Path(os.path.expanduser(self.config.status_file))
        with self._status_lock:
            try:
                data = json.dumps(self.status(), indent=1, sort_keys=True)
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(data)
                os.replace(tmp, path)
            except (OSError, LoraflightError) as e:
                log.warning("writing status file %s failed: %s", path, e)

    def _update_gauges(self) -> None:
        m = self.metrics
        if self.peers is not None:
            counts: dict[str, int] = {"live": 0, "dropped": 0, "pending": 0}
            for p in self.peers.all():
                counts[p.state] = counts.get(p.state, 0) + 1
            for state, n in counts.items():
                m.peers.labels(state).set(n)
        if self.store is not None:
            with contextlib.suppress(LoraflightError, Exception):
                st = self.store.stats()
                m.cards.set(st["cards"])
                m.store_bytes.set(st["bytes"])
                m.epoch.set(self.store.epoch)
        m.loaded.set(len(self._loaded))


def build_engine(spec: str, device: str = "cpu") -> Any:
    """An `engine.Engine` around the base model named by `engine.base_model`."""
    import re

    from loraflight.engine import Engine
    from loraflight.engine.authoring.models import load_embedding_model, tiny_encoder

    m = re.fullmatch(r"tiny(?::(\d+))?", spec)
    if m:
        model, _tok = tiny_encoder(seed=int(m.group(1) or 0))
        base = "loraflight/tiny-encoder"
    else:
        try:
            model, _tok, base = load_embedding_model(spec)
        except ConfigError:
            raise
        except (OSError, ValueError) as e:
            raise ConfigError(f"engine.base_model {spec!r} could not be loaded: {e}") from None
    if device != "cpu":
        model = model.to(device)
    return Engine(model, base_model=base)


def node_action(
    uri: str, kind: str, *, token: str | None = None, tls: ClientTLS | None = None, timeout: float = 5.0
) -> Any:
    """Call one JSON action (`status`, `peers`, `node-info`, `health`) on a running node."""
    import pyarrow as pa
    from pyarrow import flight

    from .protocol import from_flight_error
    from .security import call_headers
    from .server import normalize_uri

    uri = normalize_uri(uri, tls is not None)
    kw = tls.client_kwargs() if tls is not None else {}
    try:
        client = flight.FlightClient(uri, **kw)
    except (pa.ArrowException, OSError) as e:
        raise PeerError(f"cannot connect to {uri}: {e}") from None
    opts = flight.FlightCallOptions(timeout=timeout, headers=call_headers(token))
    try:
        out = [r.body.to_pybytes() for r in client.do_action(flight.Action(kind, b""), opts)]
    except flight.FlightError as e:
        raise from_flight_error(e, f"{uri} {kind}") from None
    except pa.ArrowException as e:
        raise PeerError(f"{uri} {kind}: {e}") from None
    finally:
        client.close()
    if not out:
        raise PeerError(f"{uri} answered {kind} with nothing")
    try:
        return json.loads(out[0])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeerError(f"{uri} answered {kind} with invalid JSON: {e}") from None


__all__ = ["ACTION_PEERS", "ACTION_STATUS", "Node", "NodeServer", "build_engine", "node_action"]
