"""PEFT interop with the real peft and transformers: save_pretrained -> card from-peft ->
card to-peft -> PeftModel.from_pretrained gives bitwise-equal tensors and identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loraflight.engine.card import LoRACard, base_fingerprint  # noqa: E402
from loraflight.engine.peft_io import from_peft, get_pattern_key, read_safetensors, to_peft  # noqa: E402
from loraflight.errors import CardError  # noqa: E402
from loraflight.federation.cli import main  # noqa: E402


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


MODELS = {
    "llama": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "bert": (_bert, ["query", "value", "dense"]),
}
PATTERNS = {
    "llama": ({"v_proj": 2, "layers.1.mlp.down_proj": 6}, {"layers.1.self_attn.q_proj": 3, "o_proj": 5}),
    "bert": ({"intermediate.dense": 2}, {"layer.1.attention.self.query": 5, "value": 7}),
}


def _outputs(model, kind: str):
    ids = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if kind == "llama" else out.last_hidden_state


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 != 0.0 and NaN payloads count."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("patterns", [False, True], ids=["plain", "patterns-rslora"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_round_trip_is_exact(tmp_path: Path, kind: str, patterns: bool, dtype: str) -> None:
    make, targets = MODELS[kind]
    tdtype = getattr(torch, dtype)
    kwargs = {}
    if patterns:
        rank_pattern, alpha_pattern = PATTERNS[kind]
        kwargs = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": True}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    base = make().to(tdtype)
    torch.manual_seed(1)
    model = get_peft_model(base, config, autocast_adapter_dtype=False)  # B is random: init_lora_weights=False
    want_params = _lora_params(model)
    assert all(v.dtype == tdtype for v in want_params.values())
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in want_params.items())
    want_out = _outputs(model, kind)
    src = tmp_path / "adapter"
    model.save_pretrained(src)

    card_path = tmp_path / "a.lora.arrow"
    assert (
        main(["card", "from-peft", str(src), str(card_path), "--name", f"{kind}-lora", "--tags", "x,y"]) == 0
    )
    card = LoRACard.open(card_path)
    card.verify()
    assert card.dtype == dtype
    assert card.header.scaling == ("rslora" if patterns else "standard")
    assert card.header.tags == ("x", "y")
    assert card.header.base_fingerprint == base_fingerprint(card.shapes)
    # per-module rank and alpha follow PEFT's pattern rules
    for m in card:
        layer = model.base_model.model.get_submodule(m.module)
        assert m.rank == layer.r["default"]
        assert m.alpha == layer.lora_alpha["default"]
        assert m.scale(card.header.scaling) == pytest.approx(layer.scaling["default"], rel=0, abs=0)
    if patterns:
        assert len({m.rank for m in card}) > 1 and len({m.alpha for m in card}) > 1

    out_dir = tmp_path / "exported"
    assert main(["card", "to-peft", str(card_path), str(out_dir)]) == 0
    a = load_file(str(src / "adapter_model.safetensors"))
    b = load_file(str(out_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k

    reloaded = PeftModel.from_pretrained(make().to(tdtype), out_dir, autocast_adapter_dtype=False).eval()
    got_params = _lora_params(reloaded)
    assert got_params.keys() == want_params.keys()
    for k, v in want_params.items():
        assert got_params[k].dtype == v.dtype
        assert torch.equal(_bits(got_params[k]), _bits(v)), k
    for name, mod in reloaded.base_model.model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            orig = model.base_model.model.get_submodule(name)
            assert mod.scaling["default"] == orig.scaling["default"], name
    assert torch.equal(_outputs(reloaded, kind), want_out)


def test_card_without_peft_header_exports_patterns(tmp_path: Path) -> None:
    """A card not made from PEFT (mixed ranks and alphas) still exports to an exact PEFT folder."""
    base = _llama()
    rng = np.random.default_rng(3)
    from loraflight.engine.card import ModuleLoRA

    mods = []
    for i, (name, mod) in enumerate(
        (n, m) for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj", "up_proj"))
    ):
        r = 2 + (i % 3)
        a = rng.standard_normal((r, mod.in_features)).astype(np.float32)
        b = rng.standard_normal((mod.out_features, r)).astype(np.float32)
        mods.append(ModuleLoRA(name, r, float(4 + (i % 2)), a, b))
    card = LoRACard.build(mods, name="made", scaling="rslora")
    to_peft(card, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["rank_pattern"] and cfg["alpha_pattern"]
    loaded = PeftModel.from_pretrained(_llama(), tmp_path / "p").eval()
    for m in mods:
        layer = loaded.base_model.model.get_submodule(m.module)
        assert layer.r["default"] == m.rank
        assert layer.scaling["default"] == m.alpha / m.rank**0.5
        assert np.array_equal(layer.lora_A["default"].weight.detach().numpy(), m.a)
        assert np.array_equal(layer.lora_B["default"].weight.detach().numpy(), m.b)
    n_lora = sum(1 for n, _ in loaded.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len(mods)  # nothing else targeted


def _save(tmp_path: Path, config: LoraConfig, name: str = "ad", make=_llama) -> Path:
    torch.manual_seed(2)
    model = get_peft_model(make(), config)
    out = tmp_path / name
    model.save_pretrained(out)
    return out


def test_dora_is_refused_naming_dora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(CardError, match="DoRA"):
        from_peft(src)
    assert main(["card", "from-peft", str(src), str(tmp_path / "x.lora.arrow")]) == 1
    err = capsys.readouterr().err
    assert "DoRA" in err and err.count("\n") == 1
    assert not (tmp_path / "x.lora.arrow").exists()


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["q_proj"], bias="lora_only"), "bias"),
        (dict(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
        (dict(target_modules=["embed_tokens", "q_proj"]), "embedding"),
    ],
)
def test_unrepresentable_adapters_are_refused_by_name(tmp_path: Path, config: dict, needle: str) -> None:
    src = _save(tmp_path, LoraConfig(r=4, **config))
    with pytest.raises(CardError, match=needle):
        from_peft(src)


def test_bias_tensor_and_unknown_tensor_and_conv_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    st = src / "adapter_model.safetensors"
    tensors = load_file(str(st))
    for extra, needle in [
        ({"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": torch.zeros(32)}, "bias"),
        ({"base_model.model.lm_head.weight": torch.zeros(96, 32)}, "not a LoRA"),
    ]:
        save_file({**tensors, **extra}, str(st))
        with pytest.raises(CardError, match=needle):
            from_peft(src)
    conv = dict(tensors)
    k = next(k for k in conv if k.endswith("lora_A.weight"))
    conv[k] = conv[k].reshape(*conv[k].shape, 1, 1)
    save_file(conv, str(st))
    with pytest.raises(CardError, match="convolution"):
        from_peft(src)


def test_unknown_config_key_with_value_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    cfg_path = src / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["some_future_feature"] = {"on": True}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CardError, match="some_future_feature"):
        from_peft(src)
    cfg["some_future_feature"] = None  # unset: harmless
    cfg_path.write_text(json.dumps(cfg))
    assert len(from_peft(src)) == 2


def test_rank_disagreeing_with_config_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    cfg_path = src / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CardError, match="rank 4"):
        from_peft(src)


def test_pickle_bin_is_never_loaded(tmp_path: Path) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    with pytest.raises(CardError, match="pickle"):
        from_peft(src)


def test_default_name_is_sanitised_folder_name(tmp_path: Path) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]), name="my adapter (v2)")
    card = from_peft(src)
    assert card.name == "my-adapter-v2"
    assert card.header.peft is not None and card.header.peft["r"] == 4


def test_malformed_safetensors_gives_card_error(tmp_path: Path) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    st = src / "adapter_model.safetensors"
    data = st.read_bytes()
    for bad in (data[:5], b"\xff" * 8 + data[8:], data[:-7]):
        st.write_bytes(bad)
        with pytest.raises(CardError):
            read_safetensors(st)


def test_get_pattern_key_matches_peft() -> None:
    from peft.utils.other import get_pattern_key as peft_key

    keys = ["v_proj", "layers.1.self_attn.q_proj", r"model\.layers\.0\.mlp\.up_proj", "q_proj"]
    for name in [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]:
        assert get_pattern_key(keys, name) == peft_key(keys, name)


def test_fp16_adapter_round_trips(tmp_path: Path) -> None:
    src = _save(
        tmp_path, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    st = src / "adapter_model.safetensors"
    half = {k: v.half() for k, v in load_file(str(st)).items()}
    save_file(half, str(st), metadata={"format": "pt"})
    card = from_peft(src, name="half")
    assert card.dtype == "float16" and all(m.alpha == 16.0 for m in card)
    to_peft(card, tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert back.keys() == half.keys()
    for k, v in half.items():
        assert back[k].dtype == torch.float16 and torch.equal(_bits(back[k]), _bits(v))
    model = PeftModel.from_pretrained(_llama().half(), tmp_path / "out", autocast_adapter_dtype=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float16
    assert torch.equal(
        _bits(layer.lora_A["default"].weight.detach()),
        _bits(half["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]),
    )


def test_mixed_dtypes_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    st = src / "adapter_model.safetensors"
    tensors = load_file(str(st))
    k = next(iter(tensors))
    tensors[k] = tensors[k].half()
    save_file(tensors, str(st))
    with pytest.raises(CardError, match="mixes dtypes"):
        from_peft(src)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"rank_pattern": {"q_proj": "x"}}, "not a number"),
        ({"rank_pattern": {"q_proj": 4.5}}, "positive whole number"),
        ({"rank_pattern": {"(": 4}}, "not a valid pattern"),
        ({"alpha_pattern": {"q_proj": [1]}}, "not a number"),
        ({"r": 0}, "positive whole number"),
    ],
)
def test_malformed_patterns_give_card_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, needle: str
) -> None:
    src = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    cfg_path = src / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with pytest.raises(CardError, match=needle):
        from_peft(src)
    assert main(["card", "from-peft", str(src), str(tmp_path / "x.lora.arrow")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
