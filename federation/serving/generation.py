"""`GenerationService`: admission and batched decoding of completion and chat requests.

Admission (`prepare`, on the admission pool) builds the prompt (completions: the text after
the BOS token; chat: the model's chat template, a 400 when it has none), checks it against
the context (400 ``context_length_exceeded``), caps `max_tokens` at ``api.max_tokens``,
resolves ``model`` against one view of the engine (``auto``: the router picks once, on the
last user message) and *leases* the digest (`Engine.lease`), so the request generates to
its end on the weights it resolved even if a newer version swaps in meanwhile. `start`
hands it to the `GenerationScheduler` (engine mixed rows by lease row), whose thread runs
the decode steps of every running request in one forward; the lease ends when the request
leaves, however it ends. The HTTP routes (`gen_routes`) go through here.

For tests there are two hooks, no API field: `on_delta(handle)` runs on the scheduler
thread after each text delta (it may block: a gate), `on_result(handle)` once at the end
(`handle.result()` has the per-step log-probabilities).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge

from loraflight.errors import EngineError, LoraflightError

from .errors import Failure, bad_request
from .gen_schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .metrics import ServingMetrics
from .resolve import AUTO, BASE, Target, models_list, resolve_model

log = logging.getLogger(__name__)

_LEASE_TRIES = 16
BASE_FINGERPRINT = "base"  # system_fingerprint and x-loraflight-digest of a request on the base model
DEFAULT_MAX_TOKENS = 256

Hook = Callable[[Any], None]


class GenerationMetrics:
    """The generation gauges and counters, on the serving metrics' registry."""

    def __init__(self, metrics: ServingMetrics) -> None:
        r = metrics.registry
        self.running = Gauge(
            "loraflight_api_generation_running", "Generation requests in the decode batch", registry=r
        )
        self.queued = Gauge(
            "loraflight_api_generation_queued",
            "Generation requests admitted and waiting for a batch slot",
            registry=r,
        )
        self.tokens = Counter(
            "loraflight_api_generated_tokens",
            "Tokens generated, by adapter (the base model id for the base)",
            ["adapter"],
            registry=r,
        )

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.queued.set(waiting)


@dataclasses.dataclass(eq=False)
class Admitted:
    """A request ready to run: its prompt, sampling, target and the lease on its digest."""

    prompt_ids: list[int]
    params: Any  # engine.generate.sampling.SamplingParams
    target: Target
    lease: Any  # engine AdapterLease, or None on the base
    base_id: str
    chat: bool
    detok_context: tuple[int, ...] = ()

    @property
    def model_label(self) -> str:
        return self.target.label(self.base_id)

    @property
    def fingerprint(self) -> str:
        return self.target.digest or BASE_FINGERPRINT

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


class GenerationService:
    """See the module doc. `close()` stops the scheduler (requests still running fail)."""

    def __init__(
        self,
        lm: Any,
        engine: Any,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_batch: int = 8,
        queue: int = 64,
        metrics: ServingMetrics | None = None,
        router_embedder: Any = None,
        model_id: str | None = None,
    ) -> None:
        from loraflight.engine.generate.scheduler import GenerationScheduler

        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise EngineError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self.lm = lm
        self.engine = engine
        self.base_id = model_id or lm.model_id
        self.max_tokens = max_tokens
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.gen_metrics = GenerationMetrics(self.metrics)
        self.created = int(time.time())
        self.on_delta: Hook | None = None
        self.on_result: Hook | None = None
        self._prefix = secrets.token_hex(4)
        self._router_embedder = router_embedder
        self._router: Any = None
        self._router_key: tuple[tuple[str, str], ...] | None = None
        self._router_lock = threading.Lock()
        self.scheduler = GenerationScheduler.for_engine(
            engine, lm, max_batch=max_batch, max_waiting=queue, on_change=self.gen_metrics.set_queue
        )

    @classmethod
    def from_config(
        cls,
        lm: Any,
        engine: Any,
        config: Any,
        *,
        metrics: ServingMetrics | None = None,
        router_embedder: Any = None,
    ) -> GenerationService:
        """A service with the limits of `config.api` (a `NodeConfig`)."""
        a = config.api
        return cls(
            lm,
            engine,
            max_tokens=a.max_tokens,
            max_batch=a.max_batch,
            queue=a.queue,
            metrics=metrics,
            router_embedder=router_embedder,
            model_id=getattr(config.engine, "model_id", "") or None,
        )

    @classmethod
    def build(
        cls, spec: str, config: Any, *, metrics: ServingMetrics | None = None, router_embedder: Any = None
    ) -> GenerationService:
        """Load the causal LM `spec` (``engine.base_model``) on ``engine.device``, wrap it in a new
        `Engine` matching cards by ``engine.model_id`` (default: the model's id), and serve it
        with `config`'s limits. The node loads its cards into ``service.engine``."""
        from loraflight.engine import Engine
        from loraflight.engine.generate.models import load_causal_lm

        lm = load_causal_lm(spec, device=config.engine.device)
        mid = getattr(config.engine, "model_id", "") or lm.model_id
        engine = Engine(lm.model, base_model=mid)
        return cls.from_config(lm, engine, config, metrics=metrics, router_embedder=router_embedder)

    # ------------------------------------------------------------------ views
    def models(self) -> dict[str, Any]:
        return models_list(self.engine.adapters, self.base_id, self.created)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.lm.has_chat_template)

    def request_id(self, handle: Any, chat: bool) -> str:
        return f"{'chatcmpl' if chat else 'cmpl'}-{self._prefix}{handle.id}"

    # ------------------------------------------------------------------ admission
    def prepare(self, req: GenerationRequest) -> Admitted | Failure:
        """Prompt, context check, sampling, resolve and lease (see the module doc)."""
        from loraflight.engine.generate.models import encode_prompt, render_chat
        from loraflight.engine.generate.sampling import SamplingParams

        chat = isinstance(req, ChatCompletionRequest)
        tok = self.lm.tokenizer
        context: tuple[int, ...]
        if isinstance(req, ChatCompletionRequest):
            if not self.has_chat_template:
                return bad_request(
                    f"the base model {self.base_id!r} has no chat template, so it cannot serve chat; "
                    "use /v1/completions with a plain prompt",
                    code="chat_template_missing",
                    param="messages",
                )
            with self.lm.lock:  # fast tokenizers refuse concurrent use
                ids = render_chat(tok, req.template_messages())
            requested, route_text, context, param = req.limit, req.last_user_message, (), "messages"
        else:
            assert isinstance(req, CompletionRequest)
            with self.lm.lock:
                ids = encode_prompt(tok, req.text)
            requested, route_text, context, param = req.max_tokens, req.text, tuple(ids), "prompt"
        ctx = int(self.lm.max_context)
        if not ids:
            return bad_request(f"the {param} gives no tokens", param=param)
        if len(ids) >= ctx or (requested is not None and len(ids) + min(requested, self.max_tokens) > ctx):
            n = min(requested, self.max_tokens) if requested is not None else 1
            return bad_request(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(ids) + n} tokens ({len(ids)} in the {param}, {n} in the completion). "
                f"Please reduce the length of the {param} or max_tokens.",
                code="context_length_exceeded",
                param=param,
            )
        n = min(requested, self.max_tokens) if requested is not None else min(self.max_tokens, ctx - len(ids))
        try:
            params = SamplingParams(
                max_tokens=n,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                seed=req.seed,
                stop=req.stops,
            )
        except EngineError as e:
            return bad_request(str(e))
        engine = self.engine
        for _ in range(_LEASE_TRIES):
            adapters = engine.adapters
            target = (
                self._auto(adapters, route_text)
                if req.model == AUTO
                else resolve_model(req.model, adapters, self.base_id)
            )
            if isinstance(target, Failure):
                return target
            try:
                lease = engine.lease([target.digest]) if target.digest is not None else None
            except EngineError:  # swapped out between the look-up and the lease: look again
                continue
            return Admitted(ids, params, target, lease, self.base_id, chat, context)
        return Failure(503, "server_error", "engine_busy", "the adapters changed during admission; retry")

    def _auto(self, adapters: dict[str, dict[str, Any]], text: str) -> Target:
        """The router's pick for `text` (the base below its threshold or with no adapters)."""
        from loraflight.engine.authoring.router import MAX_QUERY_CHARS

        router = self._router_for(adapters)
        query = text[-MAX_QUERY_CHARS:] if text.strip() else "-"
        if router is None:
            return BASE
        with self._router_lock:  # one routing at a time: the router's embedder has a tokenizer too
            routes = router.route_many([query], k=1)[0]
        by_digest = {a["digest"]: n for n, a in adapters.items()}
        n = by_digest.get(routes[0].digest) if routes else None
        a = adapters.get(n) if n is not None else None
        return BASE if a is None or n is None else Target(n, int(a["version"]), str(a["digest"]))

    def _router_for(self, adapters: dict[str, dict[str, Any]]) -> Any:
        key = tuple(sorted((n, a["digest"]) for n, a in adapters.items() if not a["auto"]))
        if not key:
            return None
        with self._router_lock:
            if key != self._router_key:
                from loraflight.engine.authoring.router import Router

                headers = self.engine.headers
                router = Router(self._router_embedder)
                for n, _d in key:
                    h = headers.get(n)
                    if h is not None:
                        router.add(h)
                self._router, self._router_key = router, key
            return self._router

    # ------------------------------------------------------------------ running
    def start(self, adm: Admitted, notify: Callable[[Any], None]) -> Any:
        """Queue an admitted request (BusyError when full); returns its `GenerationHandle`.

        `notify(handle)` runs on the scheduler thread after each delta and at the end.
        """
        row = adm.lease.row(adm.target.digest) if adm.target.digest is not None else None
        label = adm.target.name or self.base_id
        tokens = self.gen_metrics.tokens

        def ping(handle: Any) -> None:
            hook = self.on_delta
            if hook is not None and not handle.done:
                hook(handle)
            if handle.done:
                with contextlib.suppress(LoraflightError, TimeoutError):  # failed: nothing to count
                    tokens.labels(label).inc(handle.result(0).completion_tokens)
                end = self.on_result
                if end is not None:
                    end(handle)
            notify(handle)

        try:
            return self.scheduler.submit(
                adm.prompt_ids,
                adm.params,
                row,
                detok_context=adm.detok_context,
                notify=ping,
                release=adm.release,
            )
        except BaseException:
            adm.release()
            raise

    def close(self, timeout: float = 10.0) -> None:
        self.scheduler.close(timeout)


__all__ = ["BASE_FINGERPRINT", "DEFAULT_MAX_TOKENS", "Admitted", "GenerationMetrics", "GenerationService"]
