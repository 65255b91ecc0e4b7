"""The embeddings API through the real `openai` client against real uvicorn on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator

import openai
import pytest

from loraflight.engine.authoring.serving_model import TINY_ID
from loraflight.federation.serving import ApiServer

from .helpers import TOL, Reference, card, client, max_diff, serve, tiny, vec, wait_until

OPS = card("ops-runbook", 1, 1, "kubernetes pod restart crashloop deployment rollout")
DB = card("db-tuning", 1, 2, "postgres database vacuum index query planner")
C3 = card("c3", 1, 3)
C4 = card("c4", 1, 4)
OPS2 = card("ops-runbook", 2, 11, "kubernetes pod restart crashloop deployment rollout")
TEXTS = ["the pod is in crashloop after the deployment rollout", "vacuum the postgres index", "hello there"]


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


@pytest.fixture
def api() -> Iterator[ApiServer]:
    sm = tiny()
    for c in (OPS, DB, C3, C4):
        sm.engine.load(c)
    server = serve(sm)
    try:
        yield server
    finally:
        server.stop()


def test_models_list_shows_the_base_and_every_adapter(api: ApiServer) -> None:
    models = {m.id: m for m in client(api).models.list().data}
    assert set(models) == {TINY_ID, "ops-runbook", "db-tuning", "c3", "c4"}
    ops = models["ops-runbook"].model_dump()
    assert ops["parent"] == TINY_ID and ops["digest"] == OPS.digest and ops["ref"] == "ops-runbook@1"
    assert models[TINY_ID].model_dump()["parent"] is None


@pytest.mark.parametrize("fmt", ["float", "base64", openai.NOT_GIVEN])
def test_every_model_form_matches_the_engine_in_process(api: ApiServer, ref: Reference, fmt: str) -> None:
    c = client(api)
    forms = [
        ("ops-runbook", OPS, "ops-runbook@1"),
        ("ops-runbook@1", OPS, "ops-runbook@1"),
        (DB.digest, DB, "db-tuning@1"),
        (TINY_ID, None, TINY_ID),
    ]
    for model, expect, label in forms:
        raw = c.embeddings.with_raw_response.create(model=model, input=TEXTS, encoding_format=fmt)
        r = raw.parse()
        assert r.model == label
        assert raw.headers["x-loraflight-digest"] == (expect.digest if expect else "base")
        assert [d.index for d in r.data] == [0, 1, 2]
        for text, d in zip(TEXTS, r.data, strict=True):
            assert max_diff(vec(d), ref(expect, text)) <= TOL, (model, text)
        assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    # a single string is one input
    one = c.embeddings.create(model="c3", input=TEXTS[0], encoding_format=fmt)  # (not given: base64)
    assert len(one.data) == 1 and max_diff(vec(one.data[0]), ref(C3, TEXTS[0])) <= TOL


def test_auto_routes_each_input_and_the_batch_runs_mixed(api: ApiServer, ref: Reference) -> None:
    raw = client(api).embeddings.with_raw_response.create(model="auto", input=TEXTS)
    r = raw.parse()
    assert r.model == f"ops-runbook@1,db-tuning@1,{TINY_ID}"
    assert raw.headers["x-loraflight-digest"] == f"{OPS.digest},{DB.digest},base"
    for d, text, c in zip(r.data, TEXTS, (OPS, DB, None), strict=True):
        assert max_diff(vec(d), ref(c, text)) <= TOL
    # the router follows the loaded set: without db-tuning its input runs on the base
    engine = api.service.model.engine
    engine.unload("db-tuning")
    assert client(api).embeddings.create(model="auto", input=TEXTS).model == f"ops-runbook@1,{TINY_ID}"
    engine.load(DB)
    assert client(api).embeddings.create(model="auto", input=TEXTS[1]).model == "db-tuning@1"


def test_32_concurrent_requests_over_4_adapters_and_the_base_share_forwards(
    api: ApiServer, ref: Reference
) -> None:
    svc = api.service
    models = [("ops-runbook", OPS), ("db-tuning", DB), ("c3", C3), ("c4", C4), (TINY_ID, None)]
    jobs = [(models[i % 5], f"request {i} about pods and vacuum {'x ' * (i % 7)}") for i in range(32)]
    sizes: list[int] = []
    first = threading.Event()

    def gate(batch_jobs) -> None:  # hold the first forward until every request is queued
        sizes.append(len(batch_jobs))
        if not first.is_set():
            first.set()
            wait_until(lambda: svc.batcher.waiting + sum(len(j.ids) for j in batch_jobs) == 32)

    svc.batcher.before_forward = gate
    c = client(api)

    def call(job):
        (model, _card), text = job
        raw = c.embeddings.with_raw_response.create(model=model, input=[text])
        return job, raw.headers["x-loraflight-digest"], vec(raw.parse().data[0])

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, jobs))
    svc.batcher.before_forward = None
    for ((_model, cardx), text), digest, got in results:
        assert digest == (cardx.digest if cardx else "base")
        assert max_diff(got, ref(cardx, text)) <= TOL, (cardx, text)
    assert max(sizes) > 1  # requests for different adapters shared one forward


def test_hot_swap_during_traffic_keeps_each_request_on_its_admitted_digest(
    api: ApiServer, ref: Reference
) -> None:
    svc, engine = api.service, api.service.model.engine
    texts = [f"crashloop in pod {i} after rollout" for i in range(8)]
    for t in texts:  # v2 really differs from v1 on every input
        assert max_diff(ref(OPS, t), ref(OPS2, t)) > 1e-2
    entered, go = threading.Event(), threading.Event()
    held: list[int] = []

    def gate(jobs) -> None:
        if not go.is_set():
            held.append(sum(len(j.ids) for j in jobs))
            entered.set()
            assert go.wait(30)

    svc.batcher.before_forward = gate
    c = client(api)

    def call(text: str):
        raw = c.embeddings.with_raw_response.create(model="ops-runbook", input=[text])
        return text, raw.headers["x-loraflight-digest"], raw.parse().model, vec(raw.parse().data[0])

    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        before = [pool.submit(call, t) for t in texts[:4]]
        assert entered.wait(30)  # the first forward is held with v1 rows in it
        wait_until(lambda: held[0] + svc.batcher.waiting == 4)  # every v1 request is admitted
        engine.load(OPS2)  # the swap, while v1 requests are in flight
        assert engine.adapters["ops-runbook"]["digest"] == OPS2.digest
        after = [pool.submit(call, t) for t in texts[4:]]
        wait_until(lambda: held[0] + svc.batcher.waiting == 8)  # the v2 requests queue behind them
        go.set()
        results = [f.result(60) for f in before + after]
    finally:
        go.set()
        svc.batcher.before_forward = None
        pool.shutdown(wait=True)
    seen = {digest for _, digest, _, _ in results}
    assert seen == {OPS.digest, OPS2.digest}
    by_digest = {OPS.digest: (OPS, "ops-runbook@1"), OPS2.digest: (OPS2, "ops-runbook@2")}
    for text, digest, model, got in results:
        cardx, label = by_digest[digest]
        assert model == label
        assert max_diff(got, ref(cardx, text)) <= TOL, (digest[:8], text)
    assert [r[1] for r in results[:4]] == [OPS.digest] * 4  # admitted before the swap: v1
    assert [r[1] for r in results[4:]] == [OPS2.digest] * 4
    assert engine.retained == ()  # the old weights went with the last v1 request


def test_removal_during_traffic_lets_admitted_requests_finish(api: ApiServer, ref: Reference) -> None:
    svc, engine = api.service, api.service.model.engine
    entered, go = threading.Event(), threading.Event()

    def gate(_jobs) -> None:
        if not go.is_set():
            entered.set()
            assert go.wait(30)

    svc.batcher.before_forward = gate
    c = client(api)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        fut = pool.submit(lambda: c.embeddings.with_raw_response.create(model="db-tuning", input=TEXTS[1]))
        assert entered.wait(30)
        engine.unload("db-tuning")
        with pytest.raises(openai.NotFoundError):  # new requests see the removal at once
            c.embeddings.create(model="db-tuning", input="x")
        go.set()
        raw = fut.result(60)
    finally:
        go.set()
        svc.batcher.before_forward = None
        pool.shutdown(wait=True)
    assert raw.headers["x-loraflight-digest"] == DB.digest
    assert max_diff(vec(raw.parse().data[0]), ref(DB, TEXTS[1])) <= TOL
    assert engine.retained == ()
