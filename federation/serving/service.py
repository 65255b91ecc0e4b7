"""`EmbedService`: admission and batching of embedding requests on one `ServingModel`.

Admission (`prepare`) tokenizes the inputs (the context check answers 400 before anything is
queued), resolves ``model`` against one view of the engine (``auto``: the router picks per
input), and *leases* the digests it resolved (`Engine.lease`): the request then runs to the
end on those weights even if a newer version swaps in or the card goes away meanwhile, and
reports them. A lease that loses the race with a swap (the digest went between the look-up
and the lease) resolves again. `submit` hands the rows to the `Batcher`; the lease ends when
the request's future does. The HTTP app and the Flight exchange both go through here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from loraflight.errors import BusyError, EngineError

from .batcher import Batcher, Job
from .encoder import encode_rows, tokenize
from .errors import Failure, busy, failure_of
from .metrics import ServingMetrics
from .resolve import AUTO, BASE, Target, models_list, resolve_model

log = logging.getLogger(__name__)

_LEASE_TRIES = 16
BASE_DIGEST = "base"  # what x-loraflight-digest says for inputs run on the base model


@dataclasses.dataclass(eq=False)
class Prepared:
    """An admitted request: token ids, one target per input, the lease on their digests."""

    ids: list[list[int]]
    targets: list[Target]
    lease: Any  # engine AdapterLease, or None when every input runs on the base
    base_id: str

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    @property
    def model_label(self) -> str:
        """``name@version`` (comma-separated when inputs ran on several)."""
        return ",".join(dict.fromkeys(t.label(self.base_id) for t in self.targets))

    @property
    def digests(self) -> list[str]:
        return list(dict.fromkeys(t.digest or BASE_DIGEST for t in self.targets))

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


class EmbedService:
    """See the module doc. `close()` stops the batcher (admitted requests finish first)."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        queue: int = 1024,
        max_inputs: int = 2048,
        max_input_tokens: int = 0,
        metrics: ServingMetrics | None = None,
        router_embedder: Any = None,
    ) -> None:
        self.model = model
        self.base_id = model.model_id
        self.max_inputs = max_inputs
        self.max_tokens = min(model.max_length, max_input_tokens) if max_input_tokens else model.max_length
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.created = int(time.time())
        self._router_embedder = router_embedder
        self._router: Any = None
        self._router_key: tuple[tuple[str, str], ...] | None = None
        self._router_lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self.batcher = Batcher(
            self._run,
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000.0,
            queue=queue,
            on_batch=self._on_batch,
        )

    @classmethod
    def from_config(
        cls, model: Any, config: Any, *, registry: Any = None, router_embedder: Any = None
    ) -> EmbedService:
        """A service with the limits of `config.api` (a `NodeConfig`)."""
        a = config.api
        return cls(
            model,
            max_batch=a.max_batch,
            max_wait_ms=a.max_wait_ms,
            queue=a.queue,
            max_inputs=a.max_inputs,
            max_input_tokens=a.max_input_tokens,
            metrics=ServingMetrics(registry),
            router_embedder=router_embedder,
        )

    # ------------------------------------------------------------------ views
    def models(self) -> dict[str, Any]:
        return models_list(self.model.engine.adapters, self.base_id, self.created)

    @property
    def dim(self) -> int:
        cfg = getattr(self.model.model, "config", None)
        return int(getattr(cfg, "hidden_size", 0) or 0)

    # ------------------------------------------------------------------ admission
    def prepare(
        self, model: str, texts: Sequence[str], per_row: Sequence[str | None] | None = None
    ) -> Prepared | Failure:
        """Tokenize, resolve and lease (see the module doc); per_row[i] overrides `model` for input i."""
        with self._tok_lock:  # fast tokenizers refuse concurrent use ("Already borrowed")
            ids = tokenize(self.model, texts, self.max_tokens)
        if isinstance(ids, Failure):
            return ids
        names = [
            model if per_row is None or per_row[i] is None else str(per_row[i]) for i in range(len(texts))
        ]
        engine = self.model.engine
        for _ in range(_LEASE_TRIES):
            adapters = engine.adapters
            targets = self._targets(names, texts, adapters)
            if isinstance(targets, Failure):
                return targets
            digests = list(dict.fromkeys(t.digest for t in targets if t.digest is not None))
            try:
                lease = engine.lease(digests) if digests else None
            except EngineError:  # swapped out between the look-up and the lease: look again
                continue
            return Prepared(ids, targets, lease, self.base_id)
        return Failure(503, "server_error", "engine_busy", "the adapters changed during admission; retry")

    def _targets(
        self, names: list[str], texts: Sequence[str], adapters: dict[str, dict[str, Any]]
    ) -> list[Target] | Failure:
        by_model: dict[str, Target] = {}
        auto_rows = [i for i, n in enumerate(names) if n == AUTO]
        routed = self._auto(adapters, [texts[i] for i in auto_rows]) if auto_rows else []
        out: list[Target] = []
        k = 0
        for n in names:
            if n == AUTO:
                out.append(routed[k])
                k += 1
                continue
            t = by_model.get(n)
            if t is None:
                got = resolve_model(n, adapters, self.base_id)
                if isinstance(got, Failure):
                    return got
                t = by_model[n] = got
            out.append(t)
        return out

    def _auto(self, adapters: dict[str, dict[str, Any]], texts: list[str]) -> list[Target]:
        """The router's pick per text (the base below its threshold)."""
        from loraflight.engine.authoring.router import MAX_QUERY_CHARS

        router = self._router_for(adapters)
        if router is None:
            return [BASE] * len(texts)
        by_digest = {a["digest"]: n for n, a in adapters.items()}
        queries = [t[:MAX_QUERY_CHARS] if t.strip() else "-" for t in texts]
        out = []
        with self._router_lock:  # one routing at a time: the router's embedder has a tokenizer too
            ranked = router.route_many(queries, k=1)
        for routes in ranked:
            n = by_digest.get(routes[0].digest) if routes else None
            a = adapters.get(n) if n is not None else None
            out.append(BASE if a is None else Target(n, int(a["version"]), str(a["digest"])))
        return out

    def _router_for(self, adapters: dict[str, dict[str, Any]]) -> Any:
        """The router over the loaded adapters' cards, rebuilt when that set changes."""
        key = tuple(sorted((n, a["digest"]) for n, a in adapters.items() if not a["auto"]))
        if not key:
            return None
        with self._router_lock:
            if key != self._router_key:
                from loraflight.engine.authoring.router import Router

                headers = self.model.engine.headers
                router = Router(self._router_embedder)
                for n, _d in key:
                    h = headers.get(n)
                    if h is not None:
                        router.add(h)
                self._router, self._router_key = router, key
            return self._router

    # ------------------------------------------------------------------ running
    def submit(
        self, prep: Prepared, *, cancelled: Callable[[], bool] | None = None, wait_s: float = 0.0
    ) -> concurrent.futures.Future[np.ndarray]:
        """Queue an admitted request (BusyError when the queue is full); the lease ends with it."""
        lease = prep.lease
        rows = [None if t.digest is None else lease.row(t.digest) for t in prep.targets]
        labels = [t.name or self.base_id for t in prep.targets]
        job = Job(list(prep.ids), rows, cancelled or (lambda: False), labels=labels)
        try:
            fut = self.batcher.submit(job, wait_s=wait_s)
        except BaseException:
            prep.release()
            raise
        fut.add_done_callback(lambda _f: prep.release())
        self.metrics.count_inputs(labels)
        self.metrics.queued.set(self.batcher.waiting)
        return fut

    def admit(
        self,
        model: str,
        texts: Sequence[str],
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[concurrent.futures.Future[np.ndarray], Prepared] | Failure:
        """`prepare` and `submit` in one step (a queue-full is a 429 Failure).

        Once this returns a future, the lease ends with it whatever the caller does next,
        so an HTTP handler cancelled while this runs cannot leave a lease behind.
        """
        prep = self.prepare(model, texts)
        if isinstance(prep, Failure):
            return prep
        try:
            fut = self.submit(prep, cancelled=cancelled)
        except BusyError as e:
            return busy(self.batcher.waiting, self.batcher.queue) if "api.queue" in str(e) else failure_of(e)
        return fut, prep

    def embed(
        self,
        model: str,
        texts: Sequence[str],
        per_row: Sequence[str | None] | None = None,
        *,
        wait_s: float = 30.0,
        timeout: float = 300.0,
    ) -> tuple[np.ndarray, Prepared]:
        """Embed in the caller's thread (waiting for queue room up to `wait_s`); raises on failure."""
        prep = self.prepare(model, texts, per_row)
        if isinstance(prep, Failure):
            self.metrics.errors.labels(prep.code).inc()
            raise prep.to_error()
        out = self.submit(prep, wait_s=wait_s).result(timeout)
        return out, prep

    def _run(self, ids: list[Sequence[int]], rows: list[str | None]) -> np.ndarray:
        t0 = time.perf_counter()
        out = encode_rows(self.model, ids, rows)
        self.metrics.forward_seconds.observe(time.perf_counter() - t0)
        return out

    def _on_batch(self, n_rows: int, jobs: list[Job]) -> None:
        m = self.metrics
        m.batch_rows.observe(n_rows)
        m.batch_requests.observe(len(jobs))
        m.queued.set(self.batcher.waiting)

    def close(self, timeout: float = 10.0) -> None:
        self.batcher.stop(timeout)


__all__ = ["BASE_DIGEST", "EmbedService", "Prepared"]
