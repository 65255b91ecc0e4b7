"""Sampling rules (pure): parameter checks, greedy, nucleus, per-request seeds."""

from __future__ import annotations

import pytest
import torch

from loraflight.engine.generate.sampling import SamplingParams, choose_token, make_generator, nucleus
from loraflight.errors import EngineError


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": "7"}, "seed"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_parameters_are_named(kw, word):
    with pytest.raises(EngineError, match=word):
        SamplingParams(**kw)


def test_stops_of_accepts_openai_shapes():
    assert SamplingParams.stops_of(None) == ()
    assert SamplingParams.stops_of("x") == ("x",)
    assert SamplingParams.stops_of(["a", "b"]) == ("a", "b")
    with pytest.raises(EngineError, match="stop"):
        SamplingParams.stops_of([1])


def test_temperature_zero_is_argmax_with_the_models_logprob():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    tok, lp = choose_token(logits, SamplingParams(temperature=0), None)
    assert tok == 1
    assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[1]))


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    kept = nucleus(probs, 0.7)
    assert torch.allclose(kept, torch.tensor([0.0, 0.625, 0.375, 0.0]))
    assert torch.equal(nucleus(probs, 0.4) > 0, torch.tensor([False, True, False, False]))


def test_top_p_never_draws_outside_the_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    g = make_generator(3)
    p = SamplingParams(temperature=1.0, top_p=0.85)
    drawn = {choose_token(logits, p, g)[0] for _ in range(200)}
    assert drawn == {1, 2}


def test_a_seed_fixes_the_draws_and_another_changes_them():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0)

    def draws(seed):
        g = make_generator(seed)
        return [choose_token(logits, p, g)[0] for _ in range(20)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)
