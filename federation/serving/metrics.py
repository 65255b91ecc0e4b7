"""Prometheus metrics of the serving layer, on a registry the caller owns (the node's)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    """Requests, errors by code, latency, batch sizes, inputs per adapter."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "loraflight_api_requests",
            "API requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "loraflight_api_errors", "API errors by OpenAI error code", ["code"], registry=r
        )
        self.latency = Histogram(
            "loraflight_api_request_seconds",
            "Time from admission to answer, by endpoint",
            ["endpoint"],
            registry=r,
            buckets=_LATENCY,
        )
        self.inputs = Counter(
            "loraflight_api_inputs",
            "Inputs embedded, by adapter (the base model id for the base)",
            ["adapter"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "loraflight_api_batch_rows", "Rows in one forward of the batcher", registry=r, buckets=_SIZES
        )
        self.batch_requests = Histogram(
            "loraflight_api_batch_requests", "Requests sharing one forward", registry=r, buckets=_SIZES
        )
        self.forward_seconds = Histogram(
            "loraflight_api_forward_seconds", "Duration of one batched forward", registry=r, buckets=_LATENCY
        )
        self.queued = Gauge("loraflight_api_queued_inputs", "Inputs admitted and waiting", registry=r)
        self.dropped = Counter(
            "loraflight_api_dropped", "Requests dropped because their client went away", registry=r
        )

    def count_inputs(self, labels: Iterable[str]) -> None:
        for label, n in Tally(labels).items():
            self.inputs.labels(label).inc(n)


__all__ = ["ServingMetrics"]
