"""Limits of the HTTP API against slow, huge and flooding callers (docs/serving.md, "Limits").

* `ApiLimits`: the numbers (config keys under ``[api]``).
* `RateLimiter`: a token bucket per source (a digest of the bearer token when one is sent,
  else the client address); plain code, no clock of its own.
* `LimitsMiddleware` (ASGI): 429 past the source's rate; 413 from ``Content-Length`` before
  any body byte is read, or as soon as a chunked body passes the cap; 408 when the body does
  not arrive within `body_timeout_s`. The body is read here (bounded) and replayed to the app.
* `header_deadline_protocol`: uvicorn's h11 protocol with a deadline on the request line and
  headers (a connection that sends them slower than `header_timeout_s` is closed).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
from typing import Any

from .errors import Failure, too_large


@dataclasses.dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    rate: float = 1000.0  # requests per second per source (0: no rate limit)
    burst: int = 2000


class RateLimiter:
    """Token buckets by source: `allow(source, now)` takes one token or says how long to wait.
    At most `max_sources` buckets are kept (the least recently used is forgotten)."""

    def __init__(self, rate: float, burst: int, max_sources: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_sources = max_sources
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def allow(self, source: str, now: float) -> float:
        """0.0 when the request may go (a token taken), else the seconds until one is there."""
        if self.rate <= 0:
            return 0.0
        tokens, last = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return wait


def source_of(scope: dict[str, Any]) -> str:
    """Who a request is counted against: its bearer token (digested) or its address."""
    for k, v in scope.get("headers", ()):
        if k == b"authorization" and v:
            return "token:" + hashlib.sha256(v).hexdigest()[:16]
    client = scope.get("client")
    return "addr:" + (str(client[0]) if client else "unix")


def rate_limited(wait: float) -> Failure:
    return Failure(
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        "too many requests from this client (api.rate / api.burst); retry after a moment",
        retry_after=max(1.0, wait),
    )


def body_timeout(limit: float) -> Failure:
    return Failure(
        408,
        "invalid_request_error",
        "request_timeout",
        f"the request body did not arrive within {limit:g} s (api.body_timeout); send it at once",
    )


class _Refused(Exception):
    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class LimitsMiddleware:
    """See the module doc."""

    def __init__(self, app: Any, limits: ApiLimits, on_refused: Any = None) -> None:
        self.app = app
        self.limits = limits
        self.rates = RateLimiter(limits.rate, limits.burst)
        self.on_refused = on_refused  # called with each Failure (metrics), or None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        wait = self.rates.allow(source_of(scope), loop.time())
        try:
            if wait > 0:
                raise _Refused(rate_limited(wait))
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, loop)
                receive = _replay(body, receive)
        except _Refused as r:
            await self._answer(send, r.failure)
            return
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Any, receive: Any, loop: asyncio.AbstractEventLoop) -> bytes:
        cap = self.limits.max_body_bytes
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = cap + 1
                if n > cap:
                    raise _Refused(too_large(n, cap))
        end = loop.time() + self.limits.body_timeout_s
        parts: list[bytes] = []
        total = 0
        while True:
            left = end - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                msg = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                raise _Refused(body_timeout(self.limits.body_timeout_s)) from None
            if msg["type"] == "http.disconnect":
                return b"".join(parts)
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > cap:
                raise _Refused(too_large(None, cap))
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    async def _answer(self, send: Any, f: Failure) -> None:
        if self.on_refused is not None:
            self.on_refused(f)
        body = json.dumps(f.body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *((k.lower().encode(), v.encode()) for k, v in f.headers().items()),
        ]
        await send({"type": "http.response.start", "status": f.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def again() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def header_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's H11Protocol, closing a connection whose request line and headers take longer
    than `header_timeout_s` (on connect, and again after each response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None
        _waiting_cycle: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                self.transport.close()  # no request line and headers in time

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._waiting_cycle:
                self._disarm()  # a request began: its headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return DeadlineH11Protocol


__all__ = [
    "ApiLimits",
    "LimitsMiddleware",
    "RateLimiter",
    "body_timeout",
    "header_deadline_protocol",
    "rate_limited",
    "source_of",
]
