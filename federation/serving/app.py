"""The HTTP API (FastAPI): ``GET /health``, ``GET /v1/models``, ``POST /v1/embeddings``.

OpenAI-compatible shapes (docs/serving.md). Every response carries ``x-loraflight-digest``:
the digests an embeddings request ran on (``base`` for the base model), ``none`` elsewhere.
The body limit answers 413 from ``Content-Length`` before any byte is read, and counts the
bytes of a body without one while it streams in. With read tokens configured, ``/v1/*``
needs ``Authorization: Bearer TOKEN`` (401 otherwise); ``/health`` stays open for probes.
Admission (tokenizing, routing) runs on a small thread pool, so the event loop only moves
bytes; a request whose client disconnects while it waits is dropped from the batcher.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hmac
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraflight.errors import ConfigError

from .errors import Failure, failure_of, too_large, unauthorized
from .gen_routes import add_generation_routes, no_embeddings
from .generation import GenerationService
from .limits import ApiLimits, LimitsMiddleware
from .schemas import parse_embedding_request
from .service import EmbedService

log = logging.getLogger(__name__)

DIGEST_HEADER = "x-loraflight-digest"
_POLL_S = 0.05  # how often a waiting request checks that its client is still there
CLIENT_GONE = Failure(499, "invalid_request_error", "client_closed", "the client went away before the answer")


def _json(
    body: Any, status: int = 200, digest: str = "none", headers: dict[str, str] | None = None
) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        data,
        status_code=status,
        media_type="application/json",
        headers={DIGEST_HEADER: digest, **(headers or {})},
    )


def create_app(
    service: EmbedService | None,
    *,
    read_tokens: Sequence[str] = (),
    max_body_bytes: int = 8 * 1024 * 1024,
    admission: concurrent.futures.Executor | None = None,
    generation: GenerationService | None = None,
    limits: ApiLimits | None = None,
) -> FastAPI:
    """The FastAPI app over `service` (`admission`: where tokenizing and routing run; `limits`:
    rate, body size and body deadline, applied before any route, see serving/limits.py)."""
    app = FastAPI(title="loraflight", docs_url=None, redoc_url=None, openapi_url=None)
    tokens = [t.encode() for t in read_tokens]
    front: Any = service if service is not None else generation  # answers /health and /v1/models
    if front is None:
        raise ConfigError("create_app needs an embeddings service, a generation service, or both")
    metrics = front.metrics

    def fail(f: Failure, endpoint: str) -> Response:
        metrics.errors.labels(f.code).inc()
        metrics.requests.labels(endpoint, str(f.status)).inc()
        return _json(f.body(), f.status, headers=f.headers())

    def authorized(request: Request) -> bool:
        if not tokens:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, tok = got.partition(" ")
        if scheme.lower() != "bearer" or not tok:
            return False
        t = tok.strip().encode()
        return any(hmac.compare_digest(t, k) for k in tokens)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return fail(
            Failure(exc.status_code, "invalid_request_error", code, str(exc.detail)), request.url.path
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:  # never a traceback out
        log.exception("API request failed")
        return fail(failure_of(exc), request.url.path)

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "model": front.base_id})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not authorized(request):
            return fail(unauthorized(), "models")
        metrics.requests.labels("models", "200").inc()
        return _json(front.models())

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        t0 = time.perf_counter()
        if not authorized(request):
            return fail(unauthorized(), "embeddings")
        if service is None:
            return fail(no_embeddings(front.base_id), "embeddings")
        size = request.headers.get("content-length")
        if size is not None:
            try:
                n = int(size)
            except ValueError:
                n = max_body_bytes + 1
            if n > max_body_bytes:
                return fail(too_large(n, max_body_bytes), "embeddings")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body_bytes:
                return fail(too_large(None, max_body_bytes), "embeddings")
            chunks.append(chunk)
        req = parse_embedding_request(b"".join(chunks), max_inputs=service.max_inputs)
        if isinstance(req, Failure):
            return fail(req, "embeddings")
        gone = False
        loop = asyncio.get_running_loop()
        admitted = await loop.run_in_executor(
            admission, lambda: service.admit(req.model, req.texts, cancelled=lambda: gone)
        )
        if isinstance(admitted, Failure):
            return fail(admitted, "embeddings")
        fut, prep = admitted
        wrapped = asyncio.wrap_future(fut)
        try:
            while True:
                done, _ = await asyncio.wait({wrapped}, timeout=_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    gone = True  # the batcher drops it before its next forward (the lease ends there)
                    metrics.dropped.inc()
                    return fail(CLIENT_GONE, "embeddings")
            emb = wrapped.result()
        except asyncio.CancelledError:  # the server is stopping or the client went away
            gone = True
            raise
        except Exception as e:
            return fail(failure_of(e), "embeddings")
        if req.encoding_format == "base64":
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode(),
                }
                for i, row in enumerate(emb)
            ]
        else:
            data = [
                {"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(emb)
            ]
        body = {
            "object": "list",
            "data": data,
            "model": prep.model_label,
            "usage": {"prompt_tokens": prep.tokens, "total_tokens": prep.tokens},
        }
        metrics.requests.labels("embeddings", "200").inc()
        metrics.latency.labels("embeddings").observe(time.perf_counter() - t0)
        return _json(body, digest=",".join(prep.digests))

    if generation is not None:
        add_generation_routes(
            app,
            generation,
            authorized=authorized,
            fail=fail,
            max_body_bytes=max_body_bytes,
            admission=admission,
        )
    app.state.service = service
    app.state.generation = generation
    lim = limits or ApiLimits(max_body_bytes=max_body_bytes)

    def refused(f: Failure) -> None:
        metrics.errors.labels(f.code).inc()

    app.add_middleware(LimitsMiddleware, limits=lim, on_refused=refused)
    app.add_middleware(_DigestHeader)
    return app


class _DigestHeader:
    """Adds ``x-loraflight-digest: none`` to any response that does not carry one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == DIGEST_HEADER.encode() for k, _ in headers):
                    headers.append((DIGEST_HEADER.encode(), b"none"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


__all__ = ["DIGEST_HEADER", "create_app"]
