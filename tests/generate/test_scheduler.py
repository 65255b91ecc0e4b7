"""The batch scheduler at engine level, against PEFT run alone.

A tiny LlamaForCausalLM over MiniLM's vocabulary, three PEFT LoRA adapters on it (random
non-zero B) loaded into an `Engine` as cards (`peft_io.from_peft`): decode steps of
concurrent requests for different adapters and the base share one mixed-row forward, and
each request's tokens and per-step log-probabilities match the same request run alone
through the PeftModel (plain forwards, no cache) within 1e-4.
"""

from __future__ import annotations

import threading

import pytest

from loraflight.engine.generate.sampling import SamplingParams
from loraflight.engine.generate.scheduler import GenerationScheduler
from loraflight.errors import BusyError, EngineError

from .helpers import ADAPTERS, PROMPTS, TOL, build_rig, max_diff, peft_alone

WAIT = 120.0  # s: the longest any test waits for a request (bounded liveness)
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    return build_rig(tmp_path_factory.mktemp("rig"))


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n)


def test_eight_requests_over_three_adapters_and_the_base_match_peft_alone(rig):
    plan = [(PROMPTS[i], ([None, *ADAPTERS])[i % 4], 6 + 2 * i) for i in range(8)]
    with rig.scheduler(max_batch=8) as s:
        with s.held():  # all join at the same step boundary
            handles = [s.submit(rig.ids(p), greedy(n), a) for p, a, n in plan]
        results = [h.result(WAIT) for h in handles]
        assert s.step_rows[8] >= 5  # the decode steps of all eight ran in one forward
        assert s.active == 0 and s.waiting == 0
    outputs = set()
    for (p, a, n), r in zip(plan, results, strict=True):
        toks, lps = peft_alone(rig, a, rig.ids(p), n)
        assert list(r.token_ids) == toks, (p, a)
        assert max_diff(r.logprobs, lps) <= TOL, (p, a)
        assert r.finish_reason == "length" and r.completion_tokens == n
        assert r.prompt_tokens == len(rig.ids(p))
        outputs.add((p, tuple(toks)))
    # the adapters really change the output: one prompt, four different continuations
    same_prompt = {tuple(peft_alone(rig, a, rig.ids(PROMPTS[0]), 4)[0]) for a in (None, *ADAPTERS)}
    assert len(same_prompt) == 4


def test_a_request_joining_and_one_cancelled_mid_way_do_not_disturb_the_others(rig):
    gate, joined = threading.Event(), threading.Event()
    seen = {"a": 0}
    overlap = []

    def a_notify(_h):  # runs on the scheduler thread: holds the step until the test has acted
        seen["a"] += 1
        if seen["a"] == 4:
            gate.set()
            assert joined.wait(WAIT)

    with rig.scheduler(max_batch=8) as s:
        with s.held():
            ha = s.submit(rig.ids(PROMPTS[1]), greedy(30), "alpha", notify=a_notify)
            hb = s.submit(rig.ids(PROMPTS[3]), greedy(30), "beta")
        assert gate.wait(WAIT)
        hc = s.submit(rig.ids(PROMPTS[5]), greedy(8), "gamma", notify=lambda _h: overlap.append(not ha.done))
        hb.cancel()
        joined.set()
        ra, rb, rc = ha.result(WAIT), hb.result(WAIT), hc.result(WAIT)
    assert rb.finish_reason == "cancelled" and rb.completion_tokens < 30
    assert overlap and all(overlap)  # C ran while A was still running
    for r, p, a, n in ((ra, PROMPTS[1], "alpha", 30), (rc, PROMPTS[5], "gamma", 8)):
        toks, lps = peft_alone(rig, a, rig.ids(p), n)
        assert list(r.token_ids) == toks
        assert max_diff(r.logprobs, lps) <= TOL
    toks_b, _ = peft_alone(rig, "beta", rig.ids(PROMPTS[3]), 30)
    assert list(rb.token_ids) == toks_b[: rb.completion_tokens]  # what B got before it left was right


def test_a_cancelled_request_leaves_the_batch_at_once(rig):
    gate, go = threading.Event(), threading.Event()
    count = {"n": 0}

    def notify(_h):
        count["n"] += 1
        if count["n"] == 2:
            gate.set()
            assert go.wait(WAIT)

    with rig.scheduler(max_batch=2) as s:
        with s.held():
            h1 = s.submit(rig.ids("one"), greedy(40), None, notify=notify)
            h2 = s.submit(rig.ids("two"), greedy(40), "alpha")
        h3 = s.submit(rig.ids("three"), greedy(3), "beta")  # waits: the batch is full
        assert gate.wait(WAIT)
        assert s.active == 2 and s.waiting == 1
        h2.cancel()
        go.set()
        assert h2.result(WAIT).finish_reason == "cancelled"
        r3 = h3.result(WAIT)  # took the freed slot while h1 still runs
        assert not h1.done
        h1.cancel()
        assert h1.result(WAIT).finish_reason == "cancelled"
    assert r3.finish_reason == "length" and r3.completion_tokens == 3


def test_stop_strings_cut_the_text_before_them_in_the_stream_too(rig):
    ids = rig.ids(PROMPTS[2])
    with rig.scheduler() as s:
        full = s.submit(ids, greedy(12), "alpha").result(WAIT).text
        words = full.split(" ")
        assert len(words) >= 4, full
        stop = words[2][:3]  # a stop string inside the third word
        cut = full[: full.find(stop)]
        h = s.submit(ids, SamplingParams(temperature=0, max_tokens=12, stop=("zzqq", stop)), "alpha")
        streamed = "".join(h.stream(WAIT))
        r = h.result(WAIT)
    assert r.finish_reason == "stop"
    assert r.text == streamed == cut
    assert stop not in streamed


def test_max_tokens_ends_with_length_and_the_stream_is_the_text(rig):
    with rig.scheduler() as s:
        h = s.submit(rig.ids(PROMPTS[4]), greedy(5), "gamma", detok_context=rig.ids(PROMPTS[4]))
        deltas = list(h.stream(WAIT))
        r = h.result(WAIT)
    assert r.finish_reason == "length" and r.completion_tokens == 5 and len(r.token_ids) == 5
    assert "".join(deltas) == r.text
    assert r.text.startswith(" ")  # continues the prompt: its first word is spaced from it


def test_an_eos_token_ends_with_stop_and_adds_no_text(rig):
    ids = rig.ids("why")
    toks, _ = peft_alone(rig, None, ids, 3)
    # declare the third greedy token an EOS: generation must end there, its text left out
    with rig.scheduler(eos_token_ids=(*rig.lm.eos_token_ids, toks[2])) as s:
        r = s.submit(ids, greedy(10), None).result(WAIT)
    assert r.finish_reason == "stop" and list(r.token_ids) == toks
    assert r.text == rig.lm.tokenizer.decode(toks[:2], skip_special_tokens=True)


def test_a_seed_reproduces_a_sampled_request_whatever_else_runs(rig):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=10)
    ids = rig.ids(PROMPTS[6])
    with rig.scheduler() as s:
        alone = s.submit(ids, p, "beta").result(WAIT)
        with s.held():
            others = [
                s.submit(rig.ids(q), SamplingParams(temperature=1.0, max_tokens=12), a)
                for q, a in zip(PROMPTS[:3], ADAPTERS, strict=True)
            ]
            crowded = s.submit(ids, p, "beta")
        again = crowded.result(WAIT)
        other_seed = s.submit(
            ids, SamplingParams(temperature=0.9, top_p=0.95, seed=43, max_tokens=10), "beta"
        )
        r_other = other_seed.result(WAIT)
        for h in others:
            h.result(WAIT)
    assert again.token_ids == alone.token_ids and again.text == alone.text
    assert max_diff(again.logprobs, alone.logprobs) <= TOL
    assert r_other.token_ids != alone.token_ids


def test_a_failing_adapter_fails_only_its_request(rig):
    with rig.scheduler() as s:
        with s.held():
            good = s.submit(rig.ids("fine"), greedy(6), "alpha")
            bad = s.submit(rig.ids("broken"), greedy(6), "no-such-adapter")
        with pytest.raises(EngineError, match="no-such-adapter"):
            bad.result(WAIT)
        r = good.result(WAIT)
    toks, lps = peft_alone(rig, "alpha", rig.ids("fine"), 6)
    assert list(r.token_ids) == toks and max_diff(r.logprobs, lps) <= TOL


def test_context_and_queue_limits(rig):
    ctx = rig.lm.max_context
    with rig.scheduler(max_batch=1, max_waiting=1) as s:
        with pytest.raises(EngineError, match="maximum context length"):
            s.submit([101] * (ctx - 3), greedy(4))
        with pytest.raises(EngineError, match="empty"):
            s.submit([], greedy(4))
        assert s.check(ctx - 4, 4) is None
        with s.held():
            first = s.submit(rig.ids("a"), greedy(2))
            second = s.submit(rig.ids("b"), greedy(2))
            with pytest.raises(BusyError, match="full"):
                s.submit(rig.ids("c"), greedy(2))
        assert first.result(WAIT).completion_tokens == 2
        assert second.result(WAIT).completion_tokens == 2


def test_the_context_end_stops_generation_with_length(rig):
    with GenerationScheduler.for_engine(rig.engine, rig.lm, max_context=12) as s:
        r = s.submit(rig.ids("a b c d e f g"), greedy(4)).result(WAIT)
    assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens == 12


def test_closing_fails_what_is_left_and_refuses_more(rig):
    s = rig.scheduler()
    with s.held():
        h = s.submit(rig.ids("left behind"), greedy(4))
        s.close()
    with pytest.raises(EngineError, match="closed"):
        h.result(WAIT)
    with pytest.raises(EngineError, match="closed"):
        s.submit(rig.ids("late"), greedy(2))
