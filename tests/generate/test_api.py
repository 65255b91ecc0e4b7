"""The generation endpoints through the real `openai` client, on a real server (uvicorn on
127.0.0.1) over the tiny chat Llama with three PEFT adapters loaded into the engine."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import httpx
import openai
import pytest

from loraflight.engine.authoring.router import HashingEmbedder
from loraflight.engine.generate.models import encode_prompt, render_chat
from loraflight.federation.serving.generation import GenerationService
from loraflight.federation.serving.server import ApiServer, start_api

from .helpers import TOL, build_rig, max_diff, peft_alone

WAIT = 120.0


@dataclasses.dataclass
class Api:
    rig: object
    service: GenerationService
    server: ApiServer
    client: openai.OpenAI
    results: dict  # request id -> GenerationResult (the service's on_result hook)
    finished: list  # every GenerationResult (or error), once each


def start(rig, lm=None, **kw) -> Api:
    svc = GenerationService(lm or rig.lm, rig.engine, router_embedder=HashingEmbedder(), **kw)
    results: dict = {}
    finished: list = []

    def on_result(h):
        try:
            r = h.result(0)
        except Exception as e:  # a failed request: record the error
            r = e
        results[svc.request_id(h, True)] = results[svc.request_id(h, False)] = r
        finished.append(r)

    svc.on_result = on_result
    server = ApiServer(None, "127.0.0.1:0", generation=svc).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)
    return Api(rig, svc, server, client, results, finished)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    return build_rig(tmp_path_factory.mktemp("rig"))


@pytest.fixture(scope="module")
def api(rig):
    a = start(rig, max_tokens=64, max_batch=8, queue=16)
    yield a
    a.client.close()
    a.server.stop()


def digest(rig, name):
    return rig.engine.adapters[name]["digest"]


def test_completion_matches_peft_and_reports_the_adapter(api):
    rig = api.rig
    raw = api.client.completions.with_raw_response.create(
        model="alpha", prompt="hello world", max_tokens=8, temperature=0
    )
    r = raw.parse()
    assert raw.headers["x-loraflight-digest"] == digest(rig, "alpha") == r.system_fingerprint
    assert r.model == "alpha@1" and r.object == "text_completion"
    c = r.choices[0]
    assert c.finish_reason == "length"
    ids = encode_prompt(rig.lm.tokenizer, "hello world")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    toks, lps = peft_alone(rig, "alpha", ids, 8)
    got = api.results[r.id]
    assert list(got.token_ids) == toks and max_diff(got.logprobs, lps) <= TOL
    assert c.text == got.text and c.text.startswith(" ")  # continues the prompt


def test_chat_uses_the_template_and_the_base_by_its_id(api):
    rig = api.rig
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]
    r = api.client.chat.completions.create(model=rig.lm.model_id, messages=msgs, max_tokens=6, temperature=0)
    assert r.system_fingerprint == "base" and r.model == rig.lm.model_id
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    ids = render_chat(rig.lm.tokenizer, msgs)
    toks, lps = peft_alone(rig, None, ids, 6)
    got = api.results[r.id]
    assert list(got.token_ids) == toks and max_diff(got.logprobs, lps) <= TOL
    assert r.choices[0].message.content == got.text
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_reassemble_to_the_whole_text(api, chat):
    kw = {"model": "gamma", "max_tokens": 12, "temperature": 0, "stop": ["zzqx"]}
    if chat:
        kw["messages"] = [{"role": "user", "content": "stream it"}]
        whole = api.client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(api.client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        kw["prompt"] = "stream it"
        whole = api.client.completions.create(**kw).choices[0].text
        chunks = list(api.client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
    assert text == whole and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.system_fingerprint for c in chunks} == {digest(api.rig, "gamma")}


def test_raw_stream_is_sse_ending_with_done_and_carries_the_digest(api):
    body = {
        "model": "beta",
        "prompt": "raw events",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", api.server.url + "/v1/completions", json=body, timeout=WAIT) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-loraflight-digest"] == digest(api.rig, "beta")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_and_the_max_tokens_cap(api):
    first = api.client.completions.create(model="alpha", prompt="the stop test", max_tokens=10, temperature=0)
    words = first.choices[0].text.split(" ")
    stop = words[3][:2]
    r = api.client.completions.create(
        model="alpha", prompt="the stop test", max_tokens=10, temperature=0, stop=stop
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == first.choices[0].text[: first.choices[0].text.find(stop)]
    capped = api.client.completions.create(model="alpha", prompt="long", max_tokens=5000, temperature=0)
    assert capped.usage.completion_tokens <= 64  # api.max_tokens of this service
    seeded = [
        api.client.completions.create(model="beta", prompt="seeded", max_tokens=8, temperature=1.0, seed=5)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_unsupported_fields_are_a_400_naming_them(api, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        api.client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
        )
    assert e.value.body["param"] == param and repr(param) in e.value.body["message"]
    ok = api.client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=1
    )
    assert len(ok.choices) == 1


def test_context_unknown_model_and_no_template(api):
    long_prompt = "word " * 600
    with pytest.raises(openai.BadRequestError) as e:
        api.client.completions.create(model="alpha", prompt=long_prompt, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        api.client.completions.create(model="alpha", prompt="word " * 500, max_tokens=60)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        api.client.completions.create(model="no-such-skill", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    tok = copy.deepcopy(api.rig.lm.tokenizer)
    tok.chat_template = None
    other = start(api.rig, lm=dataclasses.replace(api.rig.lm, tokenizer=tok))
    try:
        with pytest.raises(openai.BadRequestError) as e:
            other.client.chat.completions.create(
                model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert e.value.body["code"] == "chat_template_missing"
        assert other.client.completions.create(model="alpha", prompt="hi", max_tokens=2).choices[0].text
    finally:
        other.client.close()
        other.server.stop()


def test_auto_routes_once_on_the_last_user_message(api):
    msgs = [
        {"role": "user", "content": "which telescopes show planets and stars"},
        {"role": "assistant", "content": "many"},
        {"role": "user", "content": "my python programming errors and tracebacks"},
    ]
    r = api.client.chat.completions.create(model="auto", messages=msgs, max_tokens=3, temperature=0)
    assert r.model == "beta@1" and r.system_fingerprint == digest(api.rig, "beta")
    r2 = api.client.completions.create(model="auto", prompt="french cooking sauces", max_tokens=3)
    assert r2.model == "alpha@1"


def gauge(api, name):
    return api.service.metrics.registry.get_sample_value(name)


def test_a_hot_swap_during_generation_leaves_each_response_whole(rig):
    """alpha@2 swaps in while a request on alpha@1 is held mid-generation (a gate in the
    scheduler thread); a request admitted after the swap gets alpha@2. Each response is
    entirely one version's: its per-step log-probabilities match that version's PEFT reference."""
    api = start(rig, max_tokens=64)
    mid, go = threading.Event(), threading.Event()
    counts: dict = {}

    def on_delta(h):  # on the scheduler thread: hold the first request after its 3rd delta
        counts[h.id] = counts.get(h.id, 0) + 1
        if counts[h.id] == 3 and not mid.is_set():
            mid.set()
            assert go.wait(WAIT)

    api.service.on_delta = on_delta
    v1 = digest(rig, "alpha")
    out: dict = {}

    def ask(key, prompt):
        chunks = list(
            api.client.completions.create(
                model="alpha", prompt=prompt, max_tokens=16, temperature=0, stream=True
            )
        )
        out[key] = chunks

    t1 = threading.Thread(target=ask, args=("first", PROMPT_A))
    t2 = threading.Thread(target=ask, args=("second", PROMPT_B))
    try:
        t1.start()
        assert mid.wait(WAIT)
        rig.engine.load(rig.cards["alpha@2"])  # the swap, while the first request is mid-way
        v2 = digest(rig, "alpha")
        assert v2 != v1
        t2.start()
        # the second request is admitted (resolved and leased) on alpha@2 before anything moves on
        assert wait_until(lambda: gauge(api, "loraflight_api_generation_queued") == 1)
        go.set()
        t1.join(WAIT)
        t2.join(WAIT)
    finally:
        go.set()
        rig.engine.load(rig.cards["alpha"])  # alpha@1 back for the other tests
        api.client.close()
        api.server.stop()
    for key, prompt, fp, ref in (("first", PROMPT_A, v1, "alpha"), ("second", PROMPT_B, v2, "alpha2")):
        chunks = out[key]
        assert {c.system_fingerprint for c in chunks} == {fp}
        got = api.results[chunks[0].id]
        toks, lps = peft_alone(rig, ref, rig.ids(prompt), 16)
        assert list(got.token_ids) == toks and max_diff(got.logprobs, lps) <= TOL, key
        assert "".join(c.choices[0].text for c in chunks) == got.text
    # and the versions really differ on these prompts
    assert (
        peft_alone(rig, "alpha", rig.ids(PROMPT_A), 16)[0]
        != peft_alone(rig, "alpha2", rig.ids(PROMPT_A), 16)[0]
    )


def test_a_disconnected_streaming_client_frees_its_batch_slot(rig):
    api = start(rig, max_tokens=64, max_batch=1, queue=4)
    streaming, closed = threading.Event(), threading.Event()
    first: dict = {}

    def on_delta(h):  # after the client closed, the first request moves only once cancelled
        if "id" not in first:
            first["id"] = h.id
        if h.id == first["id"] and closed.is_set():
            assert wait_until(lambda: h.cancel_requested)

    api.service.on_delta = on_delta
    other: dict = {}
    body = {"model": "alpha", "prompt": "a long story", "max_tokens": 64, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", api.server.url + "/v1/completions", json=body, timeout=WAIT) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")  # generating: it holds the one batch slot
            streaming.set()
            t = threading.Thread(
                target=lambda: other.update(
                    r=api.client.completions.create(model="beta", prompt="next", max_tokens=3, temperature=0)
                )
            )
            t.start()
            assert wait_until(lambda: gauge(api, "loraflight_api_generation_queued") == 1)
            assert gauge(api, "loraflight_api_generation_running") == 1
            closed.set()
        # the response is closed: the server cancels the request, the slot goes to the waiting one
        t.join(WAIT)
        assert other["r"].usage.completion_tokens == 3
        assert wait_until(lambda: gauge(api, "loraflight_api_generation_running") == 0)
        assert gauge(api, "loraflight_api_generation_queued") == 0
        cancelled = [r for r in api.finished if getattr(r, "finish_reason", None) == "cancelled"]
        assert len(cancelled) == 1 and cancelled[0].completion_tokens < 64
        assert gauge(api, "loraflight_api_dropped_total") == 1
    finally:
        closed.set()
        api.client.close()
        api.server.stop()


PROMPT_A = "the first request runs across the swap"
PROMPT_B = "the second request comes after it"


def wait_until(cond, timeout=WAIT):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_config_limits_tokens_and_bodies_apply(rig):
    from loraflight.federation.config import load_config

    cfg = load_config(env={}, flags={"api.max_tokens": 7, "api.max_batch": 4, "api.queue": 8})
    svc = GenerationService.from_config(rig.lm, rig.engine, cfg, router_embedder=HashingEmbedder())
    assert (svc.max_tokens, svc.scheduler.max_batch, svc.scheduler.max_waiting) == (7, 4, 8)
    server = ApiServer(
        None, "127.0.0.1:0", generation=svc, read_tokens=("s3cret",), max_body_bytes=400
    ).start()
    try:
        url = server.url + "/v1/completions"
        body = {"model": "alpha", "prompt": "capped", "max_tokens": 50, "temperature": 0}
        assert httpx.post(url, json=body, timeout=WAIT).status_code == 401
        auth = {"authorization": "Bearer s3cret"}
        r = httpx.post(url, json=body, headers=auth, timeout=WAIT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
        big = httpx.post(url, json={**body, "prompt": "x" * 500}, headers=auth, timeout=WAIT)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        models = httpx.get(server.url + "/v1/models", headers=auth, timeout=WAIT).json()
        ids = [m["id"] for m in models["data"]]
        assert ids[0] == rig.lm.model_id and {"alpha", "beta", "gamma"} <= set(ids)
        emb = httpx.post(server.url + "/v1/embeddings", json={"model": "alpha", "input": "x"}, headers=auth)
        assert emb.status_code == 404 and "completions" in emb.json()["error"]["message"]
    finally:
        server.stop()


def test_build_from_config_serves_the_built_in_chat_model():
    from loraflight.engine.generate.sampling import SamplingParams
    from loraflight.federation.config import load_config

    cfg = load_config(
        env={},
        flags={
            "engine.base_model": "tiny-chat-llama",
            "engine.hot_load": False,
            "api.max_tokens": 3,
            "api.listen": "127.0.0.1:0",
        },
    )
    svc = GenerationService.build(cfg.engine.base_model, cfg, router_embedder=HashingEmbedder())
    try:
        assert svc.engine.base_model == svc.base_id == "loraflight/tiny-chat-llama"
        assert svc.max_tokens == 3 and svc.has_chat_template
        h = svc.scheduler.submit([101, 7592], SamplingParams(max_tokens=3))
        assert h.result(WAIT).completion_tokens == 3
        with start_api(config=cfg, generation=svc) as server:  # what the node calls
            assert httpx.get(server.url + "/health", timeout=WAIT).json()["model"] == svc.base_id
            r = httpx.post(
                server.url + "/v1/chat/completions",
                json={"model": svc.base_id, "messages": [{"role": "user", "content": "hi"}]},
                timeout=WAIT,
            )
            assert r.json()["usage"]["completion_tokens"] == 3
        # the server does not own the service: it still generates after the server stopped
        assert svc.scheduler.submit([101], SamplingParams(max_tokens=2)).result(WAIT).completion_tokens == 2
    finally:
        svc.close()


def test_concurrent_requests_over_adapters_share_decode_steps_and_match_peft(api):
    rig = api.rig
    plan = [
        (f"request number {i} talks", ("alpha", "beta", "gamma", rig.lm.model_id)[i % 4]) for i in range(12)
    ]
    sched = api.service.scheduler

    def rows():
        return sum(n * c for n, c in sched.step_rows.items())

    steps_before, rows_before = sched.steps, rows()
    out: dict = {}

    def ask(i, prompt, model):
        if i % 2:
            r = api.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0
            )
        else:
            r = api.client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        out[i] = r

    threads = [threading.Thread(target=ask, args=(i, p, m)) for i, (p, m) in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(out) == len(plan)
    assert sched.steps - steps_before < rows() - rows_before  # some decode steps served several requests
    for i, (prompt, model) in enumerate(plan):
        r = out[i]
        adapter = None if model == rig.lm.model_id else model
        ids = (
            render_chat(rig.lm.tokenizer, [{"role": "user", "content": prompt}])
            if i % 2
            else encode_prompt(rig.lm.tokenizer, prompt)
        )
        toks, lps = peft_alone(rig, adapter, ids, 10)
        got = api.results[r.id]
        assert list(got.token_ids) == toks and max_diff(got.logprobs, lps) <= TOL, (i, model)


def test_a_full_queue_is_a_429_with_retry_after(rig):
    api = start(rig, max_tokens=16, max_batch=1, queue=0)
    held, go = threading.Event(), threading.Event()

    def on_delta(h):  # hold the one running request until the test has been refused
        held.set()
        assert go.wait(WAIT)

    api.service.on_delta = on_delta
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(r=api.client.completions.create(model="alpha", prompt="x", max_tokens=2))
    )
    try:
        t.start()
        assert held.wait(WAIT)
        r = httpx.post(
            api.server.url + "/v1/completions",
            json={"model": "beta", "prompt": "y", "max_tokens": 2},
            timeout=WAIT,
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        go.set()
        t.join(WAIT)
        assert out["r"].usage.completion_tokens == 2
    finally:
        go.set()
        api.client.close()
        api.server.stop()
