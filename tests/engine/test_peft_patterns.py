"""PEFT patterns from data never reach a regex engine (issue 13, "Bad data in the tools").

A `rank_pattern` like ``(a|a)+$`` in `card from-peft`, or in a card header's
`peft.target_modules` for `card to-peft` and the node's export, used to hang the process
while holding the GIL. The commands that could hang run in a subprocess with a bounded wait.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loraflight.engine.card import LoRACard, ModuleLoRA
from loraflight.engine.peft_io import WEIGHTS_NAME, from_peft, get_pattern_key, to_peft, write_safetensors
from loraflight.errors import CardError
from tests.cli.helpers import run_cli

EVIL = "(a|a)+$"  # exponential in Python's re against "aaaa…a.q"
LONG = "encoder." + "a" * 40 + ".q"  # a module path that makes EVIL backtrack ~2**40 times
# Seconds: the new code answers in well under one; the old one runs for days.
BOUND = float(os.environ.get("LORAFLIGHT_TEST_HANG_BOUND", "90"))


def _adapter(folder: Path, config: dict, modules: dict[str, int]) -> Path:
    """A PEFT adapter folder written by hand: {module path: rank}, in 6, out 5."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = {}
    for m, r in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = (
            "F32",
            rng.standard_normal((r, 6), dtype=np.float32),
        )
        tensors[f"base_model.model.{m}.lora_B.weight"] = (
            "F32",
            rng.standard_normal((5, r), dtype=np.float32),
        )
    write_safetensors(folder / WEIGHTS_NAME, tensors, {"format": "pt"})
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    return folder


def _card(modules: dict[str, tuple[int, float]], peft: dict | None) -> LoRACard:
    rng = np.random.default_rng(1)
    mods = [
        ModuleLoRA(
            m,
            r,
            a,
            rng.standard_normal((r, 6), dtype=np.float32),
            rng.standard_normal((5, r), dtype=np.float32),
        )
        for m, (r, a) in modules.items()
    ]
    return LoRACard.build(mods, name="pat", created="2026-01-01T00:00:00Z", peft=peft)


# ----------------------------------------------------------------------------- card from-peft


@pytest.mark.parametrize(
    "config",
    [
        {"rank_pattern": {EVIL: 4}},
        {"alpha_pattern": {EVIL: 16}},
        {"rank_pattern": {"(a*)*$": 4}, "alpha_pattern": {"(a|aa)+q": 3}},  # variants beyond the issue's
    ],
    ids=["rank_pattern", "alpha_pattern", "nested-star"],
)
def test_from_peft_with_a_catastrophic_pattern_answers(tmp_path: Path, config: dict) -> None:
    src = _adapter(tmp_path / "ad", config, {LONG: 4, "encoder.b.q": 4})
    r = run_cli("card", "from-peft", str(src), str(tmp_path / "x.lora.arrow"), "--name", "x", timeout=BOUND)
    assert r.returncode == 0, r.stderr
    card = LoRACard.open(tmp_path / "x.lora.arrow")
    assert {m.module: m.rank for m in card} == {LONG: 4, "encoder.b.q": 4}  # ranks are the tensors'


def test_pattern_semantics_follow_peft_in_linear_time(tmp_path: Path) -> None:
    """The matcher gives PEFT's answer for the patterns configs use, and EVIL costs nothing."""
    keys = [
        "v_proj",
        r"layers\.1\..*q_proj",
        "(q|k)_proj",
        r"model\.layers\.[0-9]+\.mlp\.up_proj",
        "^model.x",
    ]
    names = [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.up_proj",
        "model.x",
        "other.model.x",
    ]
    for name in names:
        got = get_pattern_key(keys, name)
        want = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), name)  # PEFT's rule
        assert got == want, name
    # EVIL against 20,000 a's would not return in re: a subprocess, so old code cannot hang the run
    code = (
        "from loraflight.engine.peft_io import get_pattern_key\n"
        f"print(get_pattern_key([{EVIL!r}, 'q'], 'a' * 20_000 + '.q'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=BOUND)
    assert r.returncode == 0 and r.stdout.strip() == "q", r.stderr


@pytest.mark.parametrize(
    ("key", "needle"),
    [(r"(a)\1", r"\1"), ("(?=q)q", "lookaround"), ("q*+", "possessive"), ("(x)" + "x" * 600, "longer than")],
)
def test_unsupported_patterns_are_refused_by_name(tmp_path: Path, key: str, needle: str) -> None:
    src = _adapter(tmp_path / "ad", {"alpha_pattern": {key: 3}}, {"encoder.q": 4})
    with pytest.raises(CardError) as e:
        from_peft(src, name="x")
    msg = str(e.value)
    assert needle in msg and "alpha_pattern" in msg and "module path" in msg


def test_too_many_pattern_characters_are_refused(tmp_path: Path) -> None:
    keys = {f"(x{i}|y)" + "." * 200: 2 for i in range(6)}  # 6 x 200+ characters of regex
    src = _adapter(tmp_path / "ad", {"alpha_pattern": keys}, {"encoder.q": 4})
    with pytest.raises(CardError, match="characters of regex patterns"):
        from_peft(src, name="x")


# ----------------------------------------------------------------------------- card to-peft and export


HOSTILE_PEFT = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": EVIL,
    "rank_pattern": {EVIL: 4},
    "alpha_pattern": {EVIL: 8},
}


def test_to_peft_of_a_card_with_a_hostile_peft_header_answers(tmp_path: Path) -> None:
    card = _card({LONG: (4, 8.0), "encoder.b.q": (2, 3.0)}, HOSTILE_PEFT)
    card.write(tmp_path / "c.lora.arrow")
    r = run_cli("card", "to-peft", str(tmp_path / "c.lora.arrow"), str(tmp_path / "out"), timeout=BOUND)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    # explicit per-module targets, ranks and alphas under plain keys: no pattern survives
    assert cfg["target_modules"] == sorted([LONG, "encoder.b.q"])
    assert cfg["rank_pattern"] == {LONG: 4, "encoder.b.q": 2}
    assert cfg["alpha_pattern"] == {LONG: 8, "encoder.b.q": 3}
    assert EVIL not in json.dumps(cfg)


def test_node_export_of_a_card_with_a_hostile_peft_header_answers(tmp_path: Path) -> None:
    card = _card({LONG: (4, 8.0)}, HOSTILE_PEFT)
    path = card.write(tmp_path / "c.lora.arrow")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from loraflight.engine.card import LoRACard\n"
        "from loraflight.federation.node.export import export_card\n"
        "from loraflight.federation.protocol import CatalogEntry\n"
        "card = LoRACard.open(sys.argv[1])\n"
        "entry = CatalogEntry(header=card.header, size=Path(sys.argv[1]).stat().st_size, rows=len(card))\n"
        "print(export_card(Path(sys.argv[1]), entry, sys.argv[2], model_id='tiny-base'))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "export")],
        capture_output=True, text=True, timeout=BOUND,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [LONG] and cfg["rank_pattern"] == {LONG: 4}
    assert cfg["base_model_name_or_path"] == "tiny-base"


def test_export_orders_keys_so_a_suffix_path_never_shadows_a_longer_one(tmp_path: Path) -> None:
    """PEFT takes the first key matching a path's end: 'q' must not give 'z.q' its rank."""
    card = _card({"q": (2, 3.0), "z.q": (4, 5.0), "a.z.q": (6, 7.0)}, None)
    to_peft(card, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    for module, (rank, alpha) in {"q": (2, 3), "z.q": (4, 5), "a.z.q": (6, 7)}.items():
        assert cfg["rank_pattern"][get_pattern_key(cfg["rank_pattern"], module)] == rank
        assert cfg["alpha_pattern"][get_pattern_key(cfg["alpha_pattern"], module)] == alpha
    peft = pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key as peft_key  # PEFT's own rule agrees

    for module, (rank, _) in {"q": (2, 3), "z.q": (4, 5), "a.z.q": (6, 7)}.items():
        assert cfg["rank_pattern"][peft_key(list(cfg["rank_pattern"]), module)] == rank
    assert peft is not None


def test_peft_loads_the_export_of_a_card_with_a_hostile_header(tmp_path: Path) -> None:
    """Real PEFT rebuilds the same tensors from what a hostile-header card exports."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip

    def make():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\..*q_proj": 5})  # fmt: skip
    torch.manual_seed(1)
    model = get_peft_model(make(), lcfg)
    model.save_pretrained(tmp_path / "src")
    card = from_peft(tmp_path / "src", name="llama")
    # forge the stored PEFT config into a hostile one (as a peer could send it), digest recomputed
    import dataclasses

    hostile = {**dict(card.header.peft or {}), "target_modules": EVIL, "rank_pattern": {EVIL: 4}}
    forged = card.with_header(dataclasses.replace(card.header, peft=hostile))
    forged = forged.with_header(forged.content_header())
    forged.verify()
    to_peft(forged, tmp_path / "out")
    loaded = PeftModel.from_pretrained(make(), tmp_path / "out").eval()
    for m in card:
        layer = loaded.base_model.model.get_submodule(m.module)
        assert layer.r["default"] == m.rank
        assert layer.scaling["default"] == m.alpha / m.rank
        assert np.array_equal(layer.lora_A["default"].weight.detach().numpy(), m.a)
    assert sum(1 for n, _ in loaded.named_modules() if n.endswith(".lora_A")) == len(card)
