"""Every refusal of the API in OpenAI's error shape, and the node keeps serving after each."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from loraflight.engine.authoring.serving_model import TINY_ID
from loraflight.federation.serving import ApiServer

from .helpers import card, client, serve, tiny, wait_until

OPS = card("ops-runbook", 1, 1)
TOKEN = "read-token-0123456789"


@pytest.fixture
def api() -> Iterator[ApiServer]:
    sm = tiny()
    sm.engine.load(OPS)
    server = serve(sm, **{"api.max_body_bytes": 4096, "api.queue": 2, "api.max_batch": 1})
    try:
        yield server
    finally:
        server.stop()


def assert_shape(e: openai.APIStatusError, status: int, code: str) -> dict:
    assert e.status_code == status
    body = e.response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    assert body["error"]["code"] == code and body["error"]["message"]
    assert e.response.headers["x-loraflight-digest"] == "none"
    return body["error"]


def still_serves(server: ApiServer, key: str = "unused") -> None:
    r = client(server, key).embeddings.create(model="ops-runbook", input="still here")
    assert len(r.data) == 1


def test_unknown_model_is_a_404_never_the_base(api: ApiServer) -> None:
    c = client(api)
    for model in ("no-such-adapter", "ops-runbook@7", "0" * 64):
        with pytest.raises(openai.NotFoundError) as ei:
            c.embeddings.create(model=model, input="x")
        err = assert_shape(ei.value, 404, "model_not_found")
        assert model in err["message"] and err["param"] == "model"
        still_serves(api)
    errors = api.service.metrics.registry.get_sample_value(
        "loraflight_api_errors_total", {"code": "model_not_found"}
    )
    assert errors == 3


def test_unsupported_and_unknown_fields_are_400s_naming_them(api: ApiServer) -> None:
    c = client(api)
    with pytest.raises(openai.BadRequestError) as ei:
        c.embeddings.create(model="ops-runbook", input="x", dimensions=8)
    err = assert_shape(ei.value, 400, "unsupported_parameter")
    assert "dimensions" in err["message"] and err["param"] == "dimensions"
    still_serves(api)
    with pytest.raises(openai.BadRequestError) as ei:
        c.embeddings.create(model="ops-runbook", input="x", extra_body={"temperature": 1})
    assert "temperature" in assert_shape(ei.value, 400, "unknown_parameter")["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        c.embeddings.create(model="ops-runbook", input=[[1, 2, 3]])
    assert "token-id" in assert_shape(ei.value, 400, "invalid_request_error")["message"]
    still_serves(api)


def test_an_input_longer_than_the_context_is_a_400(api: ApiServer) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(api).embeddings.create(model="ops-runbook", input=["short", "word " * 300])
    err = assert_shape(ei.value, 400, "context_length_exceeded")
    assert "input 1" in err["message"] and "256" in err["message"]
    still_serves(api)


def test_a_body_over_the_limit_is_a_413_before_it_is_read(api: ApiServer) -> None:
    with pytest.raises(openai.APIStatusError) as ei:
        client(api).embeddings.create(model="ops-runbook", input="x" * 5000)
    assert_shape(ei.value, 413, "request_too_large")
    still_serves(api)
    # Content-Length says 1 GB and no body byte is sent: the answer comes at once
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        got = b""
        while b"request_too_large" not in got:  # headers and body may come in two segments
            part = s.recv(65536)
            if not part:
                break
            got += part
        head = got.decode("latin-1")
    assert head.startswith("HTTP/1.1 413") and "request_too_large" in head

    # a chunked body (no Content-Length) is counted while it streams in
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "ops-runbook", "input": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(api.url + "/v1/embeddings", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    still_serves(api)


def test_a_full_queue_is_a_429_with_retry_after(api: ApiServer) -> None:
    svc = api.service
    entered, go = threading.Event(), threading.Event()

    def gate(_jobs) -> None:
        if not go.is_set():
            entered.set()
            assert go.wait(30)

    svc.batcher.before_forward = gate
    c = client(api)
    pool = concurrent.futures.ThreadPoolExecutor(3)
    try:
        first = pool.submit(c.embeddings.create, model="ops-runbook", input="one")
        assert entered.wait(30)  # one input held in the forward
        queued = [pool.submit(c.embeddings.create, model=TINY_ID, input=f"q{i}") for i in range(2)]
        wait_until(lambda: svc.batcher.waiting == 2)  # the queue (api.queue = 2) is full
        with pytest.raises(openai.RateLimitError) as ei:
            c.embeddings.create(model="ops-runbook", input="one too many")
        assert_shape(ei.value, 429, "queue_full")
        assert int(ei.value.response.headers["retry-after"]) >= 1
        go.set()
        assert all(len(f.result(60).data) == 1 for f in [first, *queued])
    finally:
        go.set()
        svc.batcher.before_forward = None
        pool.shutdown(wait=True)
    still_serves(api)


def test_read_tokens_guard_the_api_with_401s() -> None:
    sm = tiny()
    sm.engine.load(OPS)
    server = serve(sm, **{"tokens.read": [TOKEN]})
    try:
        for key in ("wrong-token-000000", "r"):
            with pytest.raises(openai.AuthenticationError) as ei:
                client(server, key).embeddings.create(model="ops-runbook", input="x")
            assert_shape(ei.value, 401, "invalid_api_key")
            with pytest.raises(openai.AuthenticationError):
                client(server, key).models.list()
        r = httpx.post(server.url + "/v1/embeddings", json={"model": "ops-runbook", "input": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/health").json()["status"] == "ok"  # probes stay open
        still_serves(server, TOKEN)
    finally:
        server.stop()


def test_unknown_paths_answer_in_the_same_shape(api: ApiServer) -> None:
    r = httpx.get(api.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.headers["x-loraflight-digest"] == "none"
    still_serves(api)
