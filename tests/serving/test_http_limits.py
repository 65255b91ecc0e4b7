"""The HTTP API against slow, huge and flooding callers: header and body deadlines, the body
cap on every route, the connection cap and per-source rate limits (docs/serving.md, "Limits").
Every socket wait is bounded."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from loraflight.federation.serving import ApiServer

from .helpers import serve, tiny


@pytest.fixture
def api(request) -> Iterator[ApiServer]:
    flags = {"api.header_timeout": 1.0, "api.body_timeout": 1.0, "api.max_body_bytes": 4096}
    flags.update(getattr(request, "param", {}))
    server = serve(tiny(), **flags)
    try:
        yield server
    finally:
        server.stop()


def _read_all(s: socket.socket, limit_s: float = 10.0) -> bytes:
    """What the server sends until it closes (bounded by `limit_s`; a timeout is an error)."""
    s.settimeout(limit_s)
    got = b""
    while True:
        part = s.recv(65536)
        if not part:
            return got
        got += part


def test_slow_headers_are_cut_off(api: ApiServer) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # and the rest never comes
        t0 = time.monotonic()
        assert _read_all(s) == b""  # closed by the header deadline, not by our timeout
        assert time.monotonic() - t0 < 9
    # a connection that sends nothing at all is closed too
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        assert _read_all(s) == b""
    assert httpx.get(api.url + "/health", timeout=10).status_code == 200


def test_a_slow_body_is_a_408(api: ApiServer) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model"'
        )
        got = _read_all(s).decode("latin-1")
    assert got.startswith("HTTP/1.1 408") and "request_timeout" in got


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
def test_the_body_cap_holds_on_every_route_before_the_body_is_read(api: ApiServer, path: str) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + b"Content-Length: 1000000000\r\n\r\n"
        )
        got = _read_all(s).decode("latin-1")
    assert got.startswith("HTTP/1.1 413") and "request_too_large" in got

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    r = httpx.post(api.url + path, content=chunks(), timeout=30)  # chunked: counted as it streams
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("api", [{"api.max_connections": 4, "api.header_timeout": 30.0}], indirect=True)
def test_the_connection_cap_answers_503_beyond_it(api: ApiServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", api.port), timeout=10) for _ in range(6)]
    try:
        time.sleep(0.3)
        r = httpx.get(api.url + "/health", timeout=10)
        assert r.status_code == 503
    finally:
        for s in idle:
            with contextlib.suppress(OSError):
                s.close()
    for _ in range(100):  # the server notices the closed sockets (bounded)
        if httpx.get(api.url + "/health", timeout=10).status_code == 200:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the API kept answering 503 after the idle connections closed")


@pytest.mark.parametrize("api", [{"api.rate": 1.0, "api.burst": 3}], indirect=True)
def test_per_source_rate_limits_are_429s_in_openai_shape(api: ApiServer) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as c:
        codes = [c.get("/v1/models", headers={"authorization": "Bearer one"}).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        r = c.get("/v1/models", headers={"authorization": "Bearer one"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error" and err["message"]
        # another source (another token) is not held back by the first one's flood
        assert c.get("/v1/models", headers={"authorization": "Bearer two"}).status_code == 200


def test_rate_limiter_rules() -> None:
    from loraflight.federation.serving.limits import RateLimiter

    r = RateLimiter(rate=2.0, burst=2, max_sources=2)
    assert r.allow("a", 0.0) == 0.0 and r.allow("a", 0.0) == 0.0
    assert r.allow("a", 0.0) == pytest.approx(0.5)  # the next token comes in half a second
    assert r.allow("a", 0.5) == 0.0
    assert r.allow("b", 0.0) == 0.0 and r.allow("c", 0.0) == 0.0  # "a" forgotten (max_sources)
    assert RateLimiter(rate=0.0, burst=1).allow("x", 0.0) == 0.0  # off
