"""The node's three loops, each a thread with bounded waits that ends when `stop` is set.

* `PeerLoop` (``lf-peers``): health calls to live peers, probes of dropped ones, DNS
  re-resolution;
* `SyncLoop` (``lf-sync``): waits for a reason to sync (a peer marked dirty: notify, a
  higher epoch, a new peer; or the slow safety poll) and runs a sync round;
* `EventLoop` (``lf-events``): hands every committed catalog change to the node in order.

`sync_round` is one pull from a set of peers with the node's sync policy.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from loraflight.errors import LoraflightError

from ..client import Client
from ..config import NodeConfig, parse_hostport
from ..discovery import resolve_dns
from ..metrics import NodeMetrics
from ..peers import Peer, PeerInfo, PeerTable
from ..protocol import CatalogEntry
from ..security import ClientTLS
from ..store import Store
from ..sync import SyncPolicy, sync

log = logging.getLogger("loraflight.federation.node")

# addresses of one peer tried per probe, each for up to intervals.health_timeout
PROBE_ADDRESSES = 4
# unconfirmed peers probed per round at most (the rest wait their turn): a flood of claimed
# addresses never delays the health calls of configured and confirmed peers
UNCONFIRMED_PROBES = 4

ClientFactory = Callable[[str, float], Client]
# (client of the peer, its node id) -> what it proved: "secret", "ca" or "" (Node._prove)
Prover = Callable[[Client, str], str]


class PeerLoop:
    """Liveness of the peer table: health calls, probes, DNS peers."""

    def __init__(
        self,
        config: NodeConfig,
        peers: PeerTable,
        pool: ThreadPoolExecutor,
        client: ClientFactory,
        metrics: NodeMetrics,
        *,
        stop: threading.Event,
        wake: threading.Event,
        own_uris: Callable[[], set[str]],
        after_round: Callable[[], None],
        swim_handles: Callable[[Peer], bool] | None = None,
        prove: Prover | None = None,
    ) -> None:
        self.swim_handles = swim_handles  # peers whose liveness SWIM checks (membership, H15)
        self.config = config
        self.peers = peers
        self.pool = pool
        self.client = client
        self.metrics = metrics
        self.stop = stop
        self.wake = wake
        self.own_uris = own_uris
        self.after_round = after_round
        self.prove = prove

    def run(self) -> None:
        cfg = self.config
        tick = max(0.05, min(cfg.intervals.health, cfg.intervals.probe, 1.0) / 2)
        next_dns = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                if cfg.discovery.dns and now >= next_dns:
                    next_dns = now + cfg.intervals.dns
                    self.resolve_dns_peers()
                self.check_peers()
                self.after_round()
            except Exception:  # one bad round must not end liveness checks for good
                log.exception("peer round failed; trying again next round")
            self.wake.wait(tick)
            self.wake.clear()

    def resolve_dns_peers(self) -> None:
        for entry in self.config.discovery.dns:
            hp = parse_hostport(entry, "discovery.dns", [])
            if hp is not None:
                own = self.own_uris()
                uris = [u for u in resolve_dns(*hp, tls=bool(self.config.tls.cert)) if u not in own]
                self.peers.set_static(f"dns:{entry}", uris)

    def check_peers(self) -> None:
        due = [(p, u) for p, u in self.peers.due() if self.swim_handles is None or not self.swim_handles(p)]
        if not due:
            return
        confirmed = [d for d in due if d[0].confirmed]
        due = confirmed + [d for d in due if not d[0].confirmed][:UNCONFIRMED_PROBES]
        timeout = self.config.intervals.health_timeout
        futs = {self.pool.submit(self.probe, uris, timeout): peer for peer, uris in due}
        done, _ = wait(futs, timeout=timeout * PROBE_ADDRESSES + 1.0)
        for f, peer in futs.items():
            if f in done and f.exception() is None:
                uri, info, err = f.result()
            else:
                uri, info, err = None, None, "health call did not finish"
            if info is None:
                self.metrics.failures.labels("health").inc()
            self.peers.record(peer, uri, info, err)

    def probe(self, uris: list[str], timeout: float) -> tuple[str | None, PeerInfo | None, str]:
        """Health-call a peer's addresses in turn; the first that answers, its info, or the error."""
        err = "no address"
        for uri in uris[:PROBE_ADDRESSES]:
            if self.stop.is_set():
                return None, None, "stopping"
            try:
                with self.client(uri, timeout) as c:
                    h = c.health()
                    node_id = str(h.get("node_id", ""))
                    proved = self.prove(c, node_id) if self.prove is not None else ""
                return (
                    uri,
                    PeerInfo(
                        node_id,
                        str(h.get("fleet_id", "")),
                        int(h.get("epoch", 0)),
                        str(h.get("protocol", "")),
                        proved=proved,
                    ),
                    "",
                )
            except (LoraflightError, OSError, ValueError) as e:
                err = str(e)
        return None, None, err


class SyncLoop:
    """Runs `sync_now(peer_keys, trigger)` when peers are marked dirty, or every `poll` seconds."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        stop: threading.Event,
        live_keys: Callable[[], list[str]],
        sync_now: Callable[[list[str], str], Any],
        metrics: NodeMetrics,
    ) -> None:
        self.config = config
        self.stop = stop
        self.live_keys = live_keys
        self.sync_now = sync_now
        self.metrics = metrics
        self._cv = threading.Condition()
        self._dirty: dict[str, str] = {}  # peer key -> reason

    def mark_dirty(self, key: str, reason: str) -> None:
        """Sync from this peer soon (the first reason given is the one counted)."""
        with self._cv:
            self._dirty.setdefault(key, reason)
            self._cv.notify_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def run(self) -> None:
        poll = self.config.intervals.poll
        next_poll = time.monotonic() + poll
        while not self.stop.is_set():
            with self._cv:
                while not self._dirty and not self.stop.is_set():
                    left = next_poll - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(min(left, 5.0))
                dirty, self._dirty = self._dirty, {}
            if self.stop.is_set():
                return
            if not dirty:
                next_poll = time.monotonic() + poll
                dirty = dict.fromkeys(self.live_keys(), "poll")
            if not dirty or not self.config.sync.enabled:
                continue
            try:
                self.sync_now(list(dirty), next(iter(dirty.values())))
            except Exception:  # e.g. the index is locked or the disk failed: the next round retries
                log.exception("sync round failed; the next trigger or poll retries")
                self.metrics.failures.labels("sync").inc()


def sync_round(
    peers: Iterable[Peer],
    config: NodeConfig,
    store: Store,
    client_tls: ClientTLS | None,
    metrics: NodeMetrics,
    *,
    connect: Callable[[str], Client] | None = None,
    vetted: Callable[[str], bool] | None = None,
    admits: Callable[[CatalogEntry], bool] | None = None,
    swarm: Any = None,
) -> list[CatalogEntry]:
    """List the peers, plan with the sync policy, fetch (bounded concurrency, verified).

    `connect` is the node's one rule for token and TLS; `vetted` says which locations a
    listing names may be tried; `admits`: the trust policy (see `sync.plan_sync`); format-2 cards come piece by piece
    through `swarm` (the node's `server.swarm`).
    """
    pol = config.sync
    report = sync(
        [p.uri or p.uris[0] for p in peers],
        SyncPolicy(base_models=tuple(pol.base_models), tags=tuple(pol.tags), names=tuple(pol.names)),
        store,
        concurrency=pol.concurrency,
        token=config.tokens.peer or None,
        tls=client_tls,
        timeout=max(config.intervals.health_timeout, 5.0),
        connect=connect,
        vetted=vetted,
        admits=admits,
        swarm=swarm,
    )
    for e in report.fetched:
        metrics.fetches.inc()
        metrics.fetched_bytes.inc(e.size)
    for ref, err in report.errors.items():
        metrics.failures.labels("fetch").inc()
        log.warning("sync: %s failed: %s", ref, err)
    for uri, err in report.peer_errors.items():
        metrics.failures.labels("list").inc()
        log.info("sync: listing %s failed: %s", uri, err)
    return list(report.fetched)


Event = tuple[str, CatalogEntry]


class EventLoop:
    """Catalog changes, handled one at a time in commit order by `handle(event, entry)`."""

    def __init__(self, handle: Callable[[str, CatalogEntry], None], *, stop: threading.Event) -> None:
        self.handle = handle
        self.stop = stop
        self._events: queue.Queue[Event | None] = queue.Queue()

    def put(self, event: str, entry: CatalogEntry) -> None:
        self._events.put((event, entry))

    def close(self) -> None:
        """Let the loop end once it has handled what was queued before."""
        self._events.put(None)

    def run(self) -> None:
        while True:
            try:
                item = self._events.get(timeout=1.0)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            try:
                if item is None:
                    return
                event, entry = item
                try:
                    self.handle(event, entry)
                except Exception:
                    log.exception("handling %s %s failed", event, entry.ref)
            finally:
                self._events.task_done()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every change queued so far is handled."""
        deadline = time.monotonic() + timeout
        with self._events.all_tasks_done:
            while self._events.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._events.all_tasks_done.wait(left)
        return True


def submit_quietly(pool: ThreadPoolExecutor | None, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on the pool; nothing when the pool is gone or shutting down (stopping)."""
    if pool is not None:
        with contextlib.suppress(RuntimeError):
            pool.submit(fn, *args)


__all__ = [
    "PROBE_ADDRESSES",
    "UNCONFIRMED_PROBES",
    "ClientFactory",
    "EventLoop",
    "PeerLoop",
    "Prover",
    "SyncLoop",
    "submit_quietly",
    "sync_round",
]
