"""The generation endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Added to the serving app by `create_app(..., generation=...)`. Same rules as the other
routes: bearer tokens, the body limit (413 from ``Content-Length`` or while the body streams
in), OpenAI error bodies, ``x-loraflight-digest`` (the digest the request runs on, ``base``
for the base model; also its ``system_fingerprint``). Admission runs on the admission pool;
the event loop only waits for the scheduler thread's notifications
(``loop.call_soon_threadsafe``) and moves bytes. ``stream: true`` answers server-sent events
(`gen_bodies`); a client that goes away, streaming or not, has its request cancelled, which
frees its batch slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from loraflight.errors import BusyError

from .errors import Failure, failure_of, too_large, unauthorized
from .gen_bodies import (
    SSE_DONE,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    sse,
    usage,
    usage_chunk,
)
from .gen_schemas import parse_generation_request
from .generation import Admitted, GenerationService

log = logging.getLogger(__name__)

DIGEST_HEADER = "x-loraflight-digest"
_POLL_S = 0.05  # how often a request waiting for tokens checks that its client is still there
_GONE = Failure(499, "invalid_request_error", "client_closed", "the client went away before the answer")


def no_embeddings(base_id: str) -> Failure:
    """The 404 of /v1/embeddings on a node whose base model is a causal LM."""
    return Failure(
        404,
        "invalid_request_error",
        "not_found",
        f"this node serves the causal LM {base_id!r}, which makes no embeddings; "
        "use /v1/completions or /v1/chat/completions",
    )


def _json(body: Any, status: int = 200, digest: str = "none") -> Response:
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(data, status_code=status, media_type="application/json", headers={DIGEST_HEADER: digest})


async def read_body(request: Request, max_body_bytes: int) -> bytes | Failure:
    """The request body, or the 413 once it is longer than `max_body_bytes`."""
    size = request.headers.get("content-length")
    if size is not None:
        try:
            n = int(size)
        except ValueError:
            n = max_body_bytes + 1
        if n > max_body_bytes:
            return too_large(n, max_body_bytes)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_body_bytes:
            return too_large(None, max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def add_generation_routes(
    app: FastAPI,
    service: GenerationService,
    *,
    authorized: Callable[[Request], bool],
    fail: Callable[[Failure, str], Response],
    max_body_bytes: int,
    admission: Any = None,
) -> None:
    """Add the two endpoints to `app` (`authorized` and `fail` are the app's own rules)."""
    metrics = service.metrics

    async def generate(request: Request, chat: bool) -> Response:
        endpoint = "chat.completions" if chat else "completions"
        t0 = time.perf_counter()
        if not authorized(request):
            return fail(unauthorized(), endpoint)
        body = await read_body(request, max_body_bytes)
        if isinstance(body, Failure):
            return fail(body, endpoint)
        req = parse_generation_request(body, chat=chat)
        if isinstance(req, Failure):
            return fail(req, endpoint)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify(_handle: Any) -> None:  # on the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(wake.set)

        # admission and queueing in one step on the pool, so that a handler cancelled meanwhile
        # (server stopping, client gone) cannot leave a queued request or a lease behind
        lock = threading.Lock()
        state: dict[str, Any] = {"gone": False, "handle": None}

        def admit() -> tuple[Admitted, Any] | Failure:
            got = service.prepare(req)
            if isinstance(got, Failure):
                return got
            h = service.start(got, notify)
            with lock:
                state["handle"], gone = h, state["gone"]
            if gone:
                h.cancel()
            return got, h

        try:
            admitted = await loop.run_in_executor(admission, admit)
        except asyncio.CancelledError:
            with lock:
                state["gone"], h = True, state["handle"]
            if h is not None:
                h.cancel()
            raise
        except BusyError as e:
            return fail(failure_of(e), endpoint)
        if isinstance(admitted, Failure):
            return fail(admitted, endpoint)
        adm, handle = admitted
        rid = service.request_id(handle, chat)
        created = int(time.time())
        if req.stream:
            events = _events(
                request, service, adm, handle, wake, rid, created, chat, req.include_usage, endpoint, t0
            )
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={DIGEST_HEADER: adm.fingerprint, "cache-control": "no-cache"},
            )
        try:
            while True:
                wake.clear()
                if handle.done:
                    break
                if await request.is_disconnected():
                    handle.cancel()
                    metrics.dropped.inc()
                    return fail(_GONE, endpoint)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), _POLL_S)
        except asyncio.CancelledError:  # the server is stopping or the client went away
            handle.cancel()
            raise
        try:
            r = handle.result(0)
        except Exception as e:
            return fail(failure_of(e), endpoint)
        make = chat_body if chat else completion_body
        out = make(
            rid,
            created,
            adm.model_label,
            adm.fingerprint,
            r.text,
            r.finish_reason,
            usage(r.prompt_tokens, r.completion_tokens),
        )
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return _json(out, digest=adm.fingerprint)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)


async def _events(
    request: Request,
    service: GenerationService,
    adm: Admitted,
    handle: Any,
    wake: asyncio.Event,
    rid: str,
    created: int,
    chat: bool,
    include_usage: bool,
    endpoint: str,
    t0: float,
) -> AsyncIterator[bytes]:
    """The server-sent events of one streamed request (see `gen_bodies`)."""
    metrics = service.metrics
    model, fp = adm.model_label, adm.fingerprint

    def chunk(text: str | None, finish: str | None = None, *, role: bool = False) -> bytes:
        if chat:
            return sse(chat_chunk(rid, created, model, fp, text, finish, role=role))
        return sse(completion_chunk(rid, created, model, fp, text or "", finish))

    try:
        if chat:
            yield chunk("", role=True)
        while True:
            wake.clear()
            deltas, done = handle.poll()
            for d in deltas:
                yield chunk(d)
            if done:
                break
            if await request.is_disconnected():
                return  # the finally below cancels the request
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), _POLL_S)
        try:
            r = handle.result(0)
        except Exception as e:
            f = failure_of(e)
            metrics.errors.labels(f.code).inc()
            metrics.requests.labels(endpoint, str(f.status)).inc()
            yield sse(f.body())
            yield SSE_DONE
            return
        yield chunk(None if chat else "", r.finish_reason)
        if include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield sse(usage_chunk(rid, obj, created, model, fp, usage(r.prompt_tokens, r.completion_tokens)))
        yield SSE_DONE
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
    finally:
        if not handle.done:
            handle.cancel()
            metrics.dropped.inc()
            log.info("streaming client of %s went away; its request was cancelled", rid)


__all__ = ["DIGEST_HEADER", "add_generation_routes", "no_embeddings", "read_body"]
