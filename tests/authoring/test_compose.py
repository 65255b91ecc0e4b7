"""Composition: one card at weight 1 is that card, interpolation endpoints are the inputs, sums are
linear, re-compression is the best rank-k fit, and a zero-delta child gives its parent's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraflight.engine.authoring import compose_add, compose_interpolate, delta_weights, make_child
from loraflight.engine.card import CardMeta, LoRACard, ModuleLoRA
from loraflight.errors import CardError

from .helpers import MLP, random_card

SHAPES = {"lin0": (12, 24), "lin1": (24, 12), "head": (12, 3)}

cards_st = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "rank": st.integers(1, 5),
        "alpha": st.sampled_from([1.0, 0.3, 8.0, 16.0]),
        "dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
        "scaling": st.sampled_from(["standard", "rslora"]),
        "modules": st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=3, unique=True),
    }
)


def _card(spec: dict, name: str = "c") -> LoRACard:
    rng = np.random.default_rng(spec["seed"])
    return random_card(
        rng,
        {m: SHAPES[m] for m in spec["modules"]},
        name=name,
        rank=spec["rank"],
        alpha=spec["alpha"],
        dtype=spec["dtype"],
        scaling=spec["scaling"],
    )


def _same_modules(x: LoRACard, y: LoRACard) -> None:
    assert x.dtype == y.dtype and x.header.scaling == y.header.scaling
    assert [m.module for m in x] == [m.module for m in y]
    for a, b in zip(x, y, strict=True):
        assert (a.rank, a.alpha) == (b.rank, b.alpha)
        assert a.a.tobytes() == b.a.tobytes() and a.b.tobytes() == b.b.tobytes()


def _close(d1: dict, d2: dict, tol: float = 1e-9) -> None:
    for k in set(d1) | set(d2):
        a, b = d1.get(k, 0.0), d2.get(k, 0.0)
        scale = max(np.abs(a).max() if np.ndim(a) else 0.0, np.abs(b).max() if np.ndim(b) else 0.0, 1.0)
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= tol * scale, k


@settings(max_examples=40)
@given(spec=cards_st)
def test_one_card_at_weight_one_is_that_card(spec):
    card = _card(spec)
    out = compose_add([card], [1.0], name="sum")
    _same_modules(out, card)
    assert out.header.base_fingerprint == card.header.base_fingerprint


@settings(max_examples=40)
@given(sa=cards_st, sb=cards_st)
def test_interpolation_endpoints_are_the_inputs(sa, sb):
    sb = {**sb, "dtype": sa["dtype"]}
    a, b = _card(sa, "a"), _card(sb, "b")
    _same_modules(compose_interpolate(a, b, 0.0, name="mid"), a)
    _same_modules(compose_interpolate(a, b, 1.0, name="mid"), b)


@settings(max_examples=30)
@given(sa=cards_st, sb=cards_st, w1=st.floats(-2, 2), w2=st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3))
def test_weighted_sum_is_linear_and_exact(sa, sb, w1, w2):
    sa, sb = {**sa, "dtype": "float32"}, {**sb, "dtype": "float32"}
    a, b = _card(sa, "a"), _card(sb, "b")
    out = compose_add([a, b], [w1, w2], name="sum", dtype="float32")
    da, db = delta_weights(a), delta_weights(b)
    want = {k: w1 * da.get(k, 0.0) + w2 * db.get(k, 0.0) for k in set(da) | set(db)}
    _close(delta_weights(out), want, tol=1e-5)  # float32 storage
    # re-compressed at a rank >= the sum's rank: still the same delta
    full = compose_add([a, b], [w1, w2], name="sum", rank=sa["rank"] + sb["rank"], dtype="float32")
    _close(delta_weights(full), want, tol=1e-4)


@settings(max_examples=25)
@given(sa=cards_st, sb=cards_st, k=st.integers(1, 4))
def test_recompression_is_the_best_rank_k_fit(sa, sb, k):
    sa, sb = {**sa, "dtype": "float32", "modules": ["lin0"]}, {**sb, "dtype": "float32", "modules": ["lin0"]}
    a, b = _card(sa, "a"), _card(sb, "b")
    out = compose_add([a, b], [0.5, 0.5], name="r", rank=k)
    want = 0.5 * delta_weights(a)["lin0"] + 0.5 * delta_weights(b)["lin0"]
    s = np.linalg.svd(want, compute_uv=False)
    got = delta_weights(out)["lin0"]
    assert out["lin0"].rank == min(k, sa["rank"] + sb["rank"])
    best = np.sqrt(np.sum(s[k:] ** 2))
    assert np.linalg.norm(got - want) == pytest.approx(best, rel=1e-3, abs=1e-4 * s[0])


def test_compose_refuses_mismatched_cards():
    rng = np.random.default_rng(0)
    a = random_card(rng, {"lin0": (12, 24)}, name="a")
    b = random_card(rng, {"lin0": (12, 8)}, name="b")
    with pytest.raises(CardError, match="not the same base"):
        compose_add([a, b], name="x")
    c = random_card(rng, {"lin0": (12, 24)}, name="c", base_model="other")
    with pytest.raises(CardError, match="different base models"):
        compose_add([a, c], name="x")
    with pytest.raises(CardError, match="one weight per card"):
        compose_add([a], [1.0, 2.0], name="x")
    with pytest.raises(CardError, match="every weight is zero"):
        compose_add([a], [0.0], name="x")


# ----------------------------------------------------------------------------- parent / child


def _zero_child(parent: LoRACard) -> LoRACard:
    rows = [
        ModuleLoRA(
            m.module,
            2,
            4.0,
            np.ones((2, m.in_features), np.float32),
            np.zeros((m.out_features, 2), np.float32),
        )
        for m in parent
    ]
    return make_child(parent, rows, name="child", dtype="float32")


def test_child_records_parent_digest():
    parent = random_card(np.random.default_rng(1), {"lin0": (12, 24), "lin1": (24, 12)}, name="parent")
    child = _zero_child(parent)
    assert child.header.lineage == (parent.digest,)
    assert child.header.base_model == parent.header.base_model
    bad = [ModuleLoRA("lin0", 1, 1.0, np.zeros((1, 5), np.float32), np.zeros((24, 1), np.float32))]
    with pytest.raises(CardError, match="does not match the parent"):
        make_child(parent, bad, name="bad")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_delta_child_gives_exactly_the_parents_outputs(dtype):
    pytest.importorskip("torch")
    from loraflight.engine import Engine

    torch.manual_seed(0)
    model = MLP()
    x = torch.randint(0, 32, (4, 7))
    parent = random_card(
        np.random.default_rng(2), {"lin0": (12, 24), "lin1": (24, 12)}, name="parent", dtype=dtype
    )
    child = _zero_child(parent)
    with torch.no_grad():
        base = model(x)
        eng = Engine(model)
        try:
            eng.load(parent)
            with_parent = model(x)
            eng.unload()
            assert torch.equal(model(x), base)
            name = eng.load(child, resolver={parent.digest: parent}.get)
            with_child = model(x)
            eng.unload(name)
        finally:
            eng.close()
    assert not torch.equal(with_parent, base)  # the parent does something
    assert torch.equal(with_child, with_parent)


def test_compositions_carry_one_card_meta():
    """The name and descriptive fields come from one CardMeta; the base model is the inputs' own."""
    rng = np.random.default_rng(7)
    parent = random_card(rng, {"lin0": (12, 24)}, name="parent")
    other = random_card(rng, {"lin0": (12, 24)}, name="other")
    meta = CardMeta("mix", version=3, description="a blend", tags=("x",), author="me")
    for card in (
        compose_add([parent, other], meta=meta),
        compose_interpolate(parent, other, 0.5, meta=meta),
        make_child(parent, other, meta=meta),
    ):
        h = card.header
        assert (h.name, h.version, h.description, h.tags, h.author) == ("mix", 3, "a blend", ("x",), "me")
        assert h.base_model == parent.header.base_model
    assert compose_add([parent], name="short").header.name == "short"  # name= alone is CardMeta(name)
    assert compose_add([parent], meta=meta.replace(base_model="tiny")).header.base_model == "tiny"
    with pytest.raises(CardError, match="names base model other, but the input cards are for tiny"):
        compose_add([parent], meta=meta.replace(base_model="other"))
    with pytest.raises(CardError, match="not both"):
        compose_add([parent], meta=meta, name="mix")
    with pytest.raises(CardError, match="needs a name"):
        make_child(parent, other)
