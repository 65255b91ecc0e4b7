"""A loraflight node: store + Flight server + discovery + peer table + sync loop + engine hot-load.

Theory of operation
-------------------
Threads, each with a bounded wait and joined on `stop()`:

* the Flight server (pyarrow's own threads) serving the store, plus two node actions,
  `peers` and `status` (`service`);
* the Zeroconf loop (`Discovery`), feeding mDNS events into the `PeerTable`;
* ``lf-peers``: health calls to live peers, probes of dropped ones, DNS re-resolution;
* ``lf-sync``: waits for a reason to sync — a `notify` from a peer, a higher catalog epoch
  in a peer's TXT or health answer, a new peer, or the slow safety poll — and pulls what
  the sync policy wants from those peers;
* ``lf-events``: reacts to every committed catalog change (published here or fetched):
  bumps the mDNS epoch, sends `notify` to live peers, exports the card as a PEFT folder
  (`export`), hot-loads it into the engine (`loader`, by the rules of `hotload`: base model
  and engine trust policy permitting; a newer version swaps in place), calls the user's
  callbacks, asks for a status-file rewrite;
* ``lf-status``: rewrites the status file after changes, at most once per 0.5 s (`status`).

News travels by `notify` first (milliseconds), mDNS epoch updates second (about a second),
and the safety poll last, so a lost message delays a card but never loses it.

`Node` wires these together; the loops live in `loops`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from loraflight.errors import ConfigError, LoraflightError

from ..client import Client
from ..config import NodeConfig, resolve_keys
from ..discovery import Discovery
from ..identity import NodeIdentity
from ..membership import Membership, SwimClient, membership_action, settings
from ..metrics import NodeMetrics
from ..peers import Peer, PeerTable
from ..protocol import PROTOCOL_VERSION, CatalogEntry
from ..security import ClientTLS, ServerTLS
from ..store import Store
from ..swarm.fetch import spreads_by_swarm
from ..swarm.settings import settings as swarm_settings
from . import loops
from .addresses import derive_locations
from .bounds import server_limits
from .engine import NodeEngine
from .export import Exporter
from .gate import PeerGate
from .hotload import trust_refusal
from .loader import Loader
from .model import build_model
from .service import NodeServer, NodeView
from .status import StatusWriter, build_status, engine_refusals, update_gauges, write_status_file

log = logging.getLogger("loraflight.federation.node")

_JOIN_TIMEOUT = 10.0

CardCallback = Callable[[CatalogEntry], None]


class Node:
    """One loraflight node; `start()`/`stop()` or use as a context manager.

    `engine` (an `engine.Engine`, or anything with its `load`/`unload`: `NodeEngine`) receives
    synced cards when `config.engine.hot_load` is on; with no engine given, one is built from
    `config.engine.base_model` when that is set. Callbacks get the `CatalogEntry`:
    `on_card_added` for every card that enters the store, `on_card_loaded` after a hot-load,
    `on_card_removed` when a card leaves the store. `model_factory(config)`, when given, builds
    the ServingModel at start instead of `engine.base_model`; while the model is built the Flight
    server already answers `status` (saying so) and `health` (not ready).
    """

    def __init__(
        self,
        config: NodeConfig,
        engine: NodeEngine | None = None,
        *,
        model: Any = None,
        model_factory: Callable[[NodeConfig], Any] | None = None,
        on_card_added: CardCallback | None = None,
        on_card_loaded: CardCallback | None = None,
        on_card_removed: CardCallback | None = None,
    ) -> None:
        self.config = config
        if model is not None and engine is not None and engine is not model.engine:
            raise ConfigError("give a Node either engine= or model= (a ServingModel carries its engine)")
        self.model = model  # a ServingModel when the node can serve requests
        self.model_factory = model_factory  # builds the ServingModel at start (else engine.base_model)
        self.engine = engine if engine is not None else (model.engine if model is not None else None)
        self.serving: Any = None  # loraflight.federation.serving.Serving while started
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
        self.base_model_id: str | None = None
        self.sync_rounds = 0
        self._engine_keys: list[str] = []
        self._client_tls: ClientTLS | None = None
        self._loader: Loader | None = None
        self._exporter: Exporter | None = None
        self._pusher: Any = None  # serving.push.Pusher while api.push is set
        self.membership: Membership | None = None  # SWIM (membership.enabled)
        self._swarm_notify = 0  # peers told at once of a swarm card published here (swarm.notify)
        self._stop = threading.Event()
        self._leaving = threading.Event()  # stop() has begun: this node announces itself no more
        self._wake_peers = threading.Event()
        self._sync = loops.SyncLoop(
            config,
            stop=self._stop,
            live_keys=lambda: (
                self.membership.poll_keys()  # the safety poll asks one random peer
                if self.membership is not None
                else [p.key for p in self.peers.syncable()]
                if self.peers is not None
                else []
            ),
            sync_now=lambda keys, trigger: self.sync_now(keys, trigger=trigger),
            metrics=self.metrics,
        )
        self._events = loops.EventLoop(self._handle, stop=self._stop)
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self._status_lock = threading.Lock()
        self._status = StatusWriter(self.write_status)  # coalesces the rewrites after changes
        self._unsubscribe: Callable[[], None] | None = None
        self._started = False
        self._arrived: dict[str, float] = {}  # digest -> wall time it entered the store
        self._loading: tuple[str, float] | None = None  # (base model, monotonic start) while it loads
        self.gate: PeerGate | None = None  # who is a peer: token, TLS, notify, hello (at start)

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
        try:
            self._start(self.config)
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def _start(self, cfg: NodeConfig) -> None:
        # A node may be started again after stop(): its loops must not see the old stop signal.
        self._stop.clear()
        self._wake_peers.clear()
        self._leaving.clear()
        root = cfg.store_path
        self.identity = NodeIdentity.load_or_create(root / "identity")
        self.store = Store(
            root,
            max_bytes=cfg.store_max_bytes or None,
            trust=cfg.trust.entry,
            withdraw_owners=cfg.trust.engine == "signed",  # who may withdraw: withdrawal.withdrawal_refusal
        )
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
        self.gate = PeerGate(
            cfg,
            client_tls=self._client_tls,
            peers=lambda: self.peers,
            store=lambda: self.store,
            node_id=lambda: self.node_id,
            my_uri=lambda: self.server.location if self.server is not None else "",
            base_model=lambda: self.base_model_id,
            engine_keys=lambda: self._engine_keys,
            mark_dirty=self._sync.mark_dirty,
            wake_peers=self._wake_peers.set,
        )
        if cfg.tokens.write and tls is None:
            log.warning("write tokens without TLS travel in clear text; configure tls.cert and tls.key")
        needs_model = self.engine is None and (
            self.model_factory is not None
            or (bool(cfg.engine.base_model) and bool(cfg.engine.hot_load or cfg.api.listen))
        )
        if cfg.api.listen and self.model is None and not needs_model:
            raise ConfigError(
                "api.listen needs a model to serve: set engine.base_model (or pass model= to Node)"
            )
        if needs_model:  # the Flight server answers status (and health: not ready) while it loads
            self._loading = (cfg.engine.base_model or "(model_factory)", time.monotonic())
        self.peers = PeerTable(
            self_id=self.identity.node_id,
            fleet=cfg.fleet,
            health_interval=cfg.intervals.health,
            probe_interval=cfg.intervals.probe,
            failures=cfg.intervals.failures,
            on_event=self._on_peer_event,
            open_fleet=self.gate.open_fleet,
        )
        if cfg.membership.enabled:
            # SWIM probes, gossip and anti-entropy (federation/membership). Made before the server
            # answers anything: a peer pinging in the start-up window would otherwise be told
            # "membership is off" and check this node by health calls from then on.
            gate = self.gate
            self.membership = Membership(
                settings(cfg),
                self_id=self.identity.node_id,
                fleet=cfg.fleet,
                peers=self.peers,
                uri=lambda: self.server.location if self.server else "",
                epoch=self.store.epoch,
                client=lambda uri, t: gate.client(uri, t, retries=0, cls=SwimClient),
                stop=self._stop,
                on_change=self._status.poke,
            )
        # Before the server: a card published while the model loads is queued for the events loop.
        self._unsubscribe = self.store.subscribe(self._on_store_event)
        listen_port = urlsplit(cfg.listen).port or 0
        swarm = swarm_settings(cfg)
        self.server = NodeServer(
            NodeView(
                loaded=self.loaded,
                live_peers=lambda: len(self.peers.live()) if self.peers is not None else 0,
                peers=lambda: self.peers.snapshot() if self.peers is not None else [],
                status=self.status,
                starting=self._starting,
                membership=lambda kind, body, caller: membership_action(self.membership, kind, body, caller),
            ),
            self.store,
            listen=cfg.listen,
            advertise=cfg.advertise or self._derive_locations(listen_port) or None,
            tls=tls,
            write_tokens=cfg.tokens.write,
            read_tokens=cfg.tokens.read,
            node_id=self.identity.node_id,
            fleet_id=cfg.fleet,
            on_notify_from=self._on_notify,
            on_hello=self.gate.on_hello,
            peer_locations=lambda digest: [],
            exchange=self._exchange,
            limits=server_limits(cfg),
            swarm_limits=swarm.limits,
        )
        self.server.swarm.fetch_config = swarm.fetch
        self._swarm_notify = swarm.notify
        if not cfg.advertise and not listen_port:
            self.server.use_locations(self._derive_locations(self.server.port))
        # the swarm tells every live peer which pieces it holds while it fetches
        self.server.swarm.peer_uris = lambda: (
            [p.uri or p.uris[0] for p in self.peers.syncable()] if self.peers else []
        )
        self.server.swarm.may_use = lambda uri: self.peers is not None and self.peers.is_source(uri)
        if cfg.metrics.port >= 0:
            self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
        try:
            generation = self._build_model(cfg) if needs_model else None
        finally:
            self._loading = None
        if self.model is not None or generation is not None:
            from loraflight.federation.serving import start_serving

            self.serving = start_serving(
                model=self.model, config=cfg, registry=self.metrics.registry, generation=generation
            )
        if self.engine is not None:
            self.base_model_id = getattr(self.engine, "base_model", None)
            if cfg.engine.hot_load and (self._loader is None or self._loader.engine is not self.engine):
                self._loader = Loader(
                    self.engine,
                    self.store,
                    base_model=self.base_model_id,
                    trust_engine=cfg.trust.engine,
                    engine_keys=self._engine_keys,
                    metrics=self.metrics,
                    on_loaded=self._after_load,
                )
            elif self._loader is not None:  # started again: same engine, what it holds stays known
                self._loader.store = self.store
        if cfg.export_dir:
            self._exporter = Exporter(
                cfg.export_dir,
                model_id=self.base_model_id or cfg.export.model_id,
                group=cfg.export.group,
                path_prefix=cfg.export.path_prefix,
                on_change=lambda: self._pusher.poke() if self._pusher is not None else None,
            )
            self._exporter.refresh_all()
        if cfg.api.push:
            from loraflight.federation.serving.push import start_push

            self._pusher = start_push(cfg, self._exporter.desired if self._exporter else dict, self.metrics)
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
        if self._loader is not None:
            self._loader.load_existing()
        peer_loop = loops.PeerLoop(
            cfg,
            self.peers,
            self._pool,
            self._client,
            self.metrics,
            stop=self._stop,
            wake=self._wake_peers,
            own_uris=lambda: set(self.server.locations) if self.server else set(),
            after_round=self._update_gauges,
            swim_handles=self.membership.handles if self.membership is not None else None,
            prove=self.gate.prove,
        )
        for name, target in (
            ("peers", peer_loop.run),
            ("sync", self._sync.run),
            ("events", self._events.run),
            *((("swim", self.membership.run),) if self.membership is not None else ()),
        ):
            t = threading.Thread(target=target, name=f"lf-{name}-{self.node_id[:6]}", daemon=True)
            t.start()
            self._threads.append(t)
        self._update_gauges()
        self._status.start()  # written now, then after changes (at most once per STATUS_DELAY)
        log.info(
            "node %s up: fleet %s, serving %s, mDNS %s, %d static peers, %d DNS peers",
            self.node_id,
            cfg.fleet,
            ", ".join(self.server.locations),
            "on" if self.mdns else "off",
            len(cfg.discovery.peers),
            len(cfg.discovery.dns),
        )

    def _build_model(self, cfg: NodeConfig) -> Any:
        """Build the engine (`model.build_model`); the GenerationService for a causal LM, else None."""
        model, self.engine, generation = build_model(cfg, self.metrics.registry, self.model_factory)
        if model is not None:
            self.model = model
        return generation

    def _starting(self) -> str | None:
        """What `health` says while the node is not ready (no model id: health needs no token)."""
        loading = self._loading
        if loading is None:
            return None
        return f"the node is loading its base model ({time.monotonic() - loading[1]:.0f} s so far)"

    def _exchange(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        """do_exchange (embeddings) once the engine is built (the server starts before it)."""
        serving = self.serving
        if serving is None:
            why = (
                "this node is still loading its base model; try again when 'loraflight status' shows it"
                if self._loading is not None
                else "this node does not serve embeddings (do_exchange): it runs no engine; "
                "start it with engine.base_model set"
            )
            raise ConfigError(why)
        serving.exchange(context, descriptor, reader, writer)

    def stop(self, timeout: float = 10.0) -> None:
        """Unregister from mDNS (peers see the goodbye), stop loops, abort transfers, close."""
        self._leaving.set()  # no hello or notify from here on: a peer must not take us back
        if self.membership is not None and self._started:
            self.membership.leave()  # a few members hear it now; gossip tells the rest
        self._stop.set()
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        self._sync.wake()
        self._wake_peers.set()
        self._events.close()
        end = time.monotonic() + timeout  # one deadline for the whole stop, not one per thread
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        self._threads = []
        self._status.close()  # the final status, written now
        if self.membership is not None:
            self.membership.close()
            self.membership = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.server is not None:
            self.server.stop(max(1.0, end - time.monotonic()))
        if self.serving is not None:
            self.serving.stop(timeout)
            self.serving = None
        if self._pusher is not None:
            self._pusher.stop(timeout)
            self._pusher = None
        if self._exporter is not None:
            self._exporter.close()
        if self.gate is not None:
            self.gate.close()  # the kept connections to peers
        if self._pool is not None:  # its workers end with their reads (client read deadlines)
            self._pool.shutdown(wait=False, cancel_futures=True)
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
        cfg = self.config
        return derive_locations(cfg.listen, port, tls=bool(cfg.tls.cert), interfaces=cfg.discovery.interfaces)

    def _client(self, uri: str, timeout: float, *, retries: int = 0) -> Client:
        """Every call to a peer: the one rule for TLS and token (`gate.PeerGate.client`)."""
        assert self.gate is not None, "node not started"
        return self.gate.client(uri, timeout, retries=retries)

    # ------------------------------------------------------------------ peers

    def _on_peer_event(self, event: str, peer: Peer) -> None:
        """Peer table events; may run on the mDNS loop, so nothing here blocks (no store I/O)."""
        if event in ("added", "back", "epoch", "confirmed"):
            self._sync.mark_dirty(peer.key, event)
        if event in ("added", "dropped", "removed", "back"):
            log.info("peer %s %s (%s)", peer.key, event, peer.uri or ",".join(peer.uris))
            self._wake_peers.set()  # confirm a new peer with a health call at once
            loops.submit_quietly(
                self._pool, self._after_peer_change, peer if event in ("added", "back") else None
            )

    def _after_peer_change(self, hello_to: Peer | None) -> None:
        if hello_to is not None and self.store is not None:
            # Say hello: a peer that knows us only from our call learns our address too.
            self._notify_peers(self.store.epoch, [hello_to])
        self._update_gauges()
        self._status.poke()

    def _on_notify(self, peer_uri: str, source: str = "addr:?") -> None:
        """A `notify` (runs on a server thread): `gate.PeerGate.on_notify` (it adds no sync source)."""
        self.metrics.notifies.inc()
        if self.gate is not None:
            self.gate.on_notify(peer_uri, source)

    def _notify_peers(self, epoch: int, peers: list[Peer] | None = None) -> None:
        if self.peers is None or self._pool is None or self.server is None or self._leaving.is_set():
            return
        me = self.server.location
        timeout = self.config.intervals.health_timeout

        def send(peer: Peer) -> None:
            uri = peer.uri or peer.uris[0]
            if self._leaving.is_set():  # queued before stop() began: a peer must not take us back
                return
            try:
                with self._client(uri, timeout) as c:
                    c.notify(me, epoch)
            except (LoraflightError, OSError) as e:
                log.debug("notify %s failed: %s", uri, e)
                self.metrics.failures.labels("notify").inc()

        for peer in self.peers.live() if peers is None else peers:
            loops.submit_quietly(self._pool, send, peer)

    # ------------------------------------------------------------------ sync

    def sync_now(self, peer_keys: Iterable[str] | None = None, trigger: str = "manual") -> list[CatalogEntry]:
        """Pull what the sync policy wants from these live peers (all when None); returns new entries."""
        assert self.peers is not None and self.store is not None
        live = {p.key: p for p in self.peers.syncable()}  # never a host only a notify named
        peers = list(live.values()) if peer_keys is None else [live[k] for k in peer_keys if k in live]
        if self.membership is not None:  # an address only gossip named is no sync source (H15)
            peers = [p for p in peers if self.membership.may_sync(p)]
        if not peers:
            return []
        self.metrics.syncs.labels(trigger).inc()
        self.sync_rounds += 1
        t0 = time.perf_counter()
        added: list[CatalogEntry] = []
        try:
            timeout = max(self.config.intervals.health_timeout, 5.0)
            added = loops.sync_round(
                peers,
                self.config,
                self.store,
                self._client_tls,
                self.metrics,
                connect=lambda uri: self._client(uri, timeout, retries=2),
                vetted=self.peers.vetted,
                admits=self.gate.admits if self.gate is not None else None,
                swarm=self.server.swarm if self.server is not None else None,
            )
        finally:
            self.metrics.sync_seconds.observe(time.perf_counter() - t0)
            self._status.poke()
        return added

    # ------------------------------------------------------------------ catalog changes

    def _on_store_event(self, event: str, entry: CatalogEntry) -> None:
        """Runs in the thread that committed the change: send the news now, do the rest later."""
        if event == "added":
            self._arrived[entry.digest] = time.time()
        if self.store is not None and not self._stop.is_set():
            epoch = self.store.epoch
            if self.discovery is not None:
                self.discovery.update_epoch(epoch)  # non-blocking: runs on the mDNS loop
            # non-blocking: runs on the I/O pool; with membership, `fanout` peers only (gossip does the
            # rest), but a card published here that the swarm spreads goes to many at once (every
            # fetcher starts while the origin sends its first pieces, none waits for gossip)
            wide = (
                self._swarm_notify if event == "added" and entry.published and spreads_by_swarm(entry) else 0
            )
            self._notify_peers(epoch, self.membership.local_change(epoch, wide) if self.membership else None)
        self._events.put(event, entry)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every catalog change so far is handled (loaded, exported, called back)."""
        return self._events.wait_idle(timeout)

    def _handle(self, event: str, entry: CatalogEntry) -> None:
        assert self.store is not None
        self._update_gauges()
        if event == "added":
            log.info("card %s (%s…) added from %s", entry.ref, entry.digest[:12], entry.source or "local")
            self._callback(self.on_card_added, entry)
            if self._loader is not None:
                self._loader.load(entry)
            self._export(entry)
            if self._loader is not None:
                self._loader.retry_awaiting()
        elif event == "removed":
            withdrawn = self.store.withdrawal(entry.name, entry.version) is not None
            log.info("card %s %s", entry.ref, "withdrawn" if withdrawn else "removed")
            if self._loader is not None:
                if withdrawn:  # children of it unloaded, the newest remaining version loaded
                    self._loader.withdrawn(entry)
                else:
                    self._loader.forget(entry)
            if self._exporter is not None:
                self._exporter.remove(entry)
            self._callback(self.on_card_removed, entry)
        self._status.poke()

    def _after_load(self, entry: CatalogEntry) -> None:
        self._update_gauges()
        self._callback(self.on_card_loaded, entry)

    def _callback(self, cb: CardCallback | None, entry: CatalogEntry) -> None:
        if cb is None:
            return
        try:
            cb(entry)
        except Exception:
            log.exception("user callback %r failed for %s", cb, entry.ref)

    def _export(self, entry: CatalogEntry) -> None:
        """Write the card as a PEFT folder `<export_dir>/<name>-v<version>` (atomic rename) and
        point `<export_dir>/<name>` at the newest version (`export.Exporter`)."""
        if self._exporter is None or self.store is None:
            return
        why = trust_refusal(entry, self.config.trust.engine, self._engine_keys)  # served too (vLLM)
        if why:
            log.info("not exporting %s: %s", entry.ref, why)
            return
        try:
            final = self._exporter.add(self.store.path_of(entry.digest), entry)
        except (LoraflightError, OSError, ImportError) as e:
            log.warning("exporting %s as a PEFT folder failed: %s", entry.ref, e)
            self.metrics.failures.labels("export").inc()
            return
        if final is not None:
            log.info("exported %s to %s", entry.ref, final)

    # ------------------------------------------------------------------ engine and status

    def loaded(self) -> dict[str, dict[str, Any]]:
        """Adapters this node loaded into its engine: name -> version, digest."""
        return self._loader.loaded() if self._loader is not None else {}

    def status(self) -> dict[str, Any]:
        """What `loraflight status` shows and the status file holds."""
        loader = self._loader
        loaded = self.loaded()
        st = build_status(
            node_id=self.node_id,
            fleet=self.config.fleet,
            uris=self.server.locations if self.server else [],
            store=self.store,
            mdns=self.mdns,
            arrived=self._arrived,
            loaded=loaded,
            loaded_at={n: loader.loaded_at(n) for n in loaded} if loader is not None else {},
            base_model=self.base_model_id,
            peers=self.peers,
            sync_rounds=self.sync_rounds,
            engine=self.engine,
            loading=self._loading,
            refused=engine_refusals(
                self.store,
                loaded,
                base_model=self.base_model_id,
                trust_engine=self.config.trust.engine,
                engine_keys=self._engine_keys,
            )
            if loader is not None
            else None,
        )
        if self._pusher is not None:  # api.push servers: ok, error, rounds, adapters pushed
            st["push"] = self._pusher.state()
        if self.membership is not None:  # SWIM: incarnation, members and their states
            st["membership"] = self.membership.snapshot()
        return st

    def write_status(self) -> None:
        """Atomically rewrite the status file now (when configured); changes only poke `_status`."""
        if not self.config.status_file or self.store is None:
            return
        with self._status_lock:
            try:
                write_status_file(self.config.status_file, self.status())
            except (OSError, LoraflightError) as e:
                log.warning("writing status file %s failed: %s", self.config.status_file, e)

    def _update_gauges(self) -> None:
        update_gauges(
            self.metrics, self.peers, self.store, len(self._loader) if self._loader is not None else 0
        )


__all__ = ["CardCallback", "Node"]
