"""Prometheus metrics of one node: its own `CollectorRegistry`, optionally served over HTTP.

Several nodes can live in one process (the demo, tests), so nothing goes to the global registry.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraflight.errors import ConfigError

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NodeMetrics:
    """The node's counters, gauges and histograms."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.peers = Gauge("loraflight_peers", "Peers in the table, by state", ["state"], registry=r)
        self.cards = Gauge("loraflight_cards", "Cards in the local store", registry=r)
        self.store_bytes = Gauge("loraflight_store_bytes", "Bytes of cards in the local store", registry=r)
        self.loaded = Gauge("loraflight_loaded_adapters", "Adapters loaded into the engine", registry=r)
        self.epoch = Gauge("loraflight_catalog_epoch", "Local catalog epoch", registry=r)
        self.fetched_bytes = Counter("loraflight_fetched_bytes", "Card bytes fetched from peers", registry=r)
        self.fetches = Counter("loraflight_fetches", "Cards fetched from peers", registry=r)
        self.failures = Counter(
            "loraflight_failures",
            "Failures by kind (fetch, list, health, load, notify, export, sync, push)",
            ["kind"],
            registry=r,
        )
        self.notifies = Counter(
            "loraflight_notifies_received", "notify actions received from peers", registry=r
        )
        self.syncs = Counter("loraflight_syncs", "Sync rounds run, by trigger", ["trigger"], registry=r)
        self.sync_seconds = Histogram(
            "loraflight_sync_seconds", "Duration of one sync round", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.load_seconds = Histogram(
            "loraflight_load_seconds",
            "Duration of one hot-load into the engine",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.push_calls = Counter(
            "loraflight_push_calls",
            "Runtime LoRA API calls to api.push servers, by server, op (load, unload) and outcome "
            "(ok, error, taken: the name was loaded already, held: loaded already from this node's path, "
            "absent: nothing to unload)",
            ["server", "op", "outcome"],
            registry=r,
        )
        self._server: Any = None
        self._thread: Any = None
        self.port: int | None = None

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve /metrics over HTTP on its own thread; returns the bound port."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ConfigError(
                f"metrics: cannot serve on {host}:{port}: {e.strerror or e}; choose another metrics.port "
                "(0: any free port, -1: off) or metrics.host"
            ) from None
        self.port = int(self._server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5.0)
            self._server = self._thread = None

    def text(self) -> str:
        return generate_latest(self.registry).decode()


__all__ = ["NodeMetrics"]
