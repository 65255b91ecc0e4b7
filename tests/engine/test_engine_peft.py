"""Parity with real PEFT on tiny LlamaForCausalLM and BertModel built from config (no download).

Cards come from PEFT folders through `engine.peft_io.from_peft` (what `card from-peft` runs).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from loraflight.engine import Engine
from loraflight.engine.peft_io import from_peft

TOL = 1e-5


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=120,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg).eval()


CASES = {
    "llama": (
        tiny_llama,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        ),
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "down_proj"],
            use_rslora=True,
            init_lora_weights=False,
        ),
    ),
    "bert": (
        tiny_bert,
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"], init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=8, target_modules=["key", "query"], init_lora_weights=False),
    ),
}


def out(model: torch.nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        r = model(input_ids=x, **kw)
    return r.logits if hasattr(r, "logits") else r.last_hidden_state


@pytest.fixture(params=sorted(CASES))
def setup(request, tmp_path: Path):
    build, cfg_a, cfg_b = CASES[request.param]
    base = build()
    ours = copy.deepcopy(base)
    pristine = {k: v.clone() for k, v in ours.state_dict().items()}
    torch.manual_seed(1)
    pm = get_peft_model(base, cfg_a, adapter_name="one")
    pm.add_adapter("two", cfg_b)
    pm.eval()
    pm.save_pretrained(tmp_path)
    # PEFT saves a non-default adapter in a sub-folder named after it
    cards = {k: from_peft(tmp_path / n, name=k) for k, n in (("a", "one"), ("b", "two"))}
    x = torch.randint(0, 120, (4, 9), generator=torch.Generator().manual_seed(5))
    return ours, pristine, pm, cards, x


def test_one_adapter_matches_peft(setup):
    ours, _, pm, cards, x = setup
    eng = Engine(ours)
    eng.load(cards["a"])
    pm.base_model.set_adapter("one")
    got, want = out(ours, x), out(pm, x)
    assert (got - want).abs().max().item() <= TOL
    with pm.disable_adapter():
        assert (got - out(pm, x)).abs().max().item() > 1e-3  # the adapter does something


def test_several_adapters_match_peft_multi_adapter(setup):
    ours, _, pm, cards, x = setup
    eng = Engine(ours)
    eng.load(cards["a"])
    eng.load(cards["b"])
    assert eng.active == ("a", "b")
    pm.base_model.set_adapter(["one", "two"])
    assert (out(ours, x) - out(pm, x)).abs().max().item() <= TOL


def test_mixed_batch_matches_rows_alone_and_peft(setup):
    ours, _, pm, cards, x = setup
    eng = Engine(ours)
    eng.load(cards["a"], activate=False)
    eng.load(cards["b"], activate=False)
    names = ["a", None, "b", "a"]
    with eng.mixed(names):
        got = out(ours, x)
    for i, n in enumerate(names):
        eng.deactivate()
        if n is not None:
            eng.activate(n)
        alone = out(ours, x[i : i + 1])
        assert (got[i] - alone[0]).abs().max().item() <= TOL, (i, n)
    peft_names = [{"a": "one", "b": "two", None: "__base__"}[n] for n in names]
    assert (got - out(pm, x, adapter_names=peft_names)).abs().max().item() <= TOL


def test_merged_equals_unmerged_and_unload_pristine(setup):
    ours, pristine, _, cards, x = setup
    originals = {n: m for n, m in ours.named_modules()}
    base_out = out(ours, x)
    eng = Engine(ours)
    eng.load(cards["a"])
    eng.load(cards["b"])
    unmerged = out(ours, x)
    eng.merge()
    assert (out(ours, x) - unmerged).abs().max().item() <= TOL
    eng.unmerge()
    eng.unload("b")
    eng.unload()
    assert torch.equal(out(ours, x), base_out)
    sd = ours.state_dict()
    assert list(sd) == list(pristine)
    assert all(torch.equal(sd[k], v) for k, v in pristine.items())
    assert all(ours.get_submodule(n) is m for n, m in originals.items())
    # load → unload (never merged) is pristine too
    eng.load(cards["a"])
    eng.unload()
    assert torch.equal(out(ours, x), base_out)
