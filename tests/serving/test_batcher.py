"""The cross-request batcher alone: batch sizes, the queue bound, dropped clients, stopping."""

from __future__ import annotations

import socket
import threading

import httpx
import numpy as np
import pytest

from loraflight.errors import BusyError
from loraflight.federation.serving.batcher import Batcher, Job

from .helpers import card, serve, tiny, wait_until


class Recorder:
    """run_batch that returns each row's first token id and records every batch."""

    def __init__(self) -> None:
        self.batches: list[list[str | None]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, ids, rows) -> np.ndarray:
        assert self.gate.wait(30)
        self.batches.append(list(rows))
        return np.array([[float(x[0])] for x in ids], dtype=np.float32)


def job(first: int, n: int, row: str | None = None, cancelled=lambda: False) -> Job:
    return Job([[first + i] for i in range(n)], [row] * n, cancelled)


def test_rows_of_several_requests_share_forwards_of_at_most_max_batch() -> None:
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch=4, max_wait_s=0.0, queue=100)
    try:
        held = b.submit(job(0, 1, "a"))  # the first forward takes this one and waits at the gate
        wait_until(lambda: b.waiting == 0)
        futs = [b.submit(job(10, 3, "a")), b.submit(job(20, 6, None)), b.submit(job(30, 1, "b"))]
        assert b.waiting == 10
        rec.gate.set()
        outs = [f.result(30) for f in [held, *futs]]
    finally:
        b.stop()
    assert [o[:, 0].tolist() for o in outs] == [[0], [10, 11, 12], [20, 21, 22, 23, 24, 25], [30]]
    assert [len(x) for x in rec.batches] == [1, 4, 4, 2]  # 10 queued rows: 4 + 4 + 2
    assert rec.batches[1] == ["a", "a", "a", None]  # two requests, mixed rows, one forward


def test_a_full_queue_refuses_and_a_wait_gets_room() -> None:
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch=1, max_wait_s=0.0, queue=2)
    try:
        first = b.submit(job(0, 1))
        wait_until(lambda: b.waiting == 0)
        queued = b.submit(job(1, 2))
        with pytest.raises(BusyError, match=r"api\.queue"):
            b.submit(job(3, 1))
        with pytest.raises(BusyError, match="can never fit"):
            b.submit(job(4, 3))
        threading.Timer(0.05, rec.gate.set).start()
        late = b.submit(job(5, 1), wait_s=30)  # waits for room instead of failing
        assert late.result(30)[0, 0] == 5 and first.result(30)[0, 0] == 0 and len(queued.result(30)) == 2
    finally:
        rec.gate.set()
        b.stop()


def test_a_request_whose_client_left_is_dropped_before_it_runs() -> None:
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch=8, max_wait_s=0.0, queue=100)
    gone = threading.Event()
    try:
        first = b.submit(job(0, 1))
        wait_until(lambda: b.waiting == 0)
        dropped = b.submit(job(10, 3, cancelled=gone.is_set))
        kept = b.submit(job(20, 2))
        gone.set()
        rec.gate.set()
        assert kept.result(30)[:, 0].tolist() == [20, 21] and first.result(30)[0, 0] == 0
        assert dropped.cancelled()
    finally:
        b.stop()
    assert [len(x) for x in rec.batches] == [1, 2]  # the dropped request's 3 rows never ran


def test_stop_runs_what_was_admitted_and_refuses_more() -> None:
    rec = Recorder()
    b = Batcher(rec, max_batch=2, max_wait_s=0.0, queue=100)
    futs = [b.submit(job(i * 10, 3)) for i in range(3)]
    b.stop()
    assert [f.result(30)[:, 0].tolist() for f in futs] == [[0, 1, 2], [10, 11, 12], [20, 21, 22]]
    with pytest.raises(BusyError, match="shutting down"):
        b.submit(job(0, 1))


def test_the_api_drops_a_request_when_its_client_disconnects() -> None:
    sm = tiny()
    sm.engine.load(card("ops", 1, 1))
    server = serve(sm, **{"api.max_batch": 1})
    svc = server.service
    entered, go = threading.Event(), threading.Event()
    ran: list[int] = []

    def gate(jobs) -> None:
        ran.append(sum(len(j.ids) for j in jobs))
        if not go.is_set():
            entered.set()
            assert go.wait(30)

    svc.batcher.before_forward = gate
    try:
        holder = threading.Thread(
            target=lambda: httpx.post(
                server.url + "/v1/embeddings", json={"model": "ops", "input": "first"}, timeout=60
            )
        )
        holder.start()
        assert entered.wait(30)
        body = b'{"model": "ops", "input": ["a", "b", "c"]}'
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: svc.batcher.waiting == 3)  # admitted and queued
        # the client is gone: the request is dropped once the handler notices
        wait_until(lambda: svc.metrics.registry.get_sample_value("loraflight_api_dropped_total") == 1)
        go.set()
        holder.join(30)
        wait_until(lambda: svc.batcher.waiting == 0)
    finally:
        go.set()
        svc.batcher.before_forward = None
        server.stop()
    assert ran == [1]  # only the first request's input ever reached a forward


def test_stop_lets_a_request_in_flight_finish_and_metrics_count_it() -> None:
    from prometheus_client import CollectorRegistry

    from loraflight.federation.config import load_config
    from loraflight.federation.serving import start_api

    sm = tiny()
    sm.engine.load(card("ops", 1, 1))
    registry = CollectorRegistry()
    server = start_api(
        model=sm, config=load_config(env={}, flags={"api.listen": "127.0.0.1:0"}), registry=registry
    )
    svc = server.service
    entered, go = threading.Event(), threading.Event()

    def gate(_jobs) -> None:
        entered.set()
        assert go.wait(30)

    svc.batcher.before_forward = gate
    answers: list[httpx.Response] = []
    t = threading.Thread(
        target=lambda: answers.append(
            httpx.post(server.url + "/v1/embeddings", json={"model": "ops", "input": ["a", "b"]}, timeout=60)
        )
    )
    t.start()
    assert entered.wait(30)
    stopper = threading.Thread(target=server.stop)
    stopper.start()  # stopping while the request is in the forward
    go.set()
    t.join(30)
    stopper.join(30)
    assert not stopper.is_alive() and answers and answers[0].status_code == 200
    assert len(answers[0].json()["data"]) == 2
    assert registry.get_sample_value("loraflight_api_inputs_total", {"adapter": "ops"}) == 2
    assert (
        registry.get_sample_value(
            "loraflight_api_requests_total", {"endpoint": "embeddings", "status": "200"}
        )
        == 1
    )
    assert registry.get_sample_value("loraflight_api_batch_rows_count") == 1
    with pytest.raises(httpx.TransportError):  # stopped: nothing listens any more
        httpx.get(server.url + "/health", timeout=5)
