"""The engine on a CUDA GPU: fp32/fp16/bf16, PEFT parity, mixed rows, exact unload (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loraflight.engine import Engine, LoRACard
from loraflight.engine.card.torch import card_from_tensors

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def model_on_gpu(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    return m.to("cuda", dtype).eval()


def gpu_card(name: str, seed: int) -> LoRACard:
    g = torch.Generator().manual_seed(seed)
    tens = {
        "0": (torch.randn(8, 64, generator=g) * 0.2, torch.randn(128, 8, generator=g) * 0.2),
        "2": (torch.randn(8, 128, generator=g) * 0.2, torch.randn(64, 8, generator=g) * 0.2),
    }
    return card_from_tensors(tens, name=name, alpha=16.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_load_mixed_merge_unload(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_on_gpu(dtype)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 10, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        base = model(x)
    eng = Engine(model)
    eng.load(gpu_card("a", 1))
    eng.load(gpu_card("b", 2), activate=False)
    info = eng.adapters["a"]
    assert info["device"].startswith("cuda") and info["dtype"] == str(dtype).removeprefix("torch.")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        only_a = model(x)
        mixed = eng.forward_mixed(["a", None, "b", "a"], x)
    assert (mixed[0] - only_a[0]).abs().max().item() <= tol
    assert (mixed[1] - base[1]).abs().max().item() <= tol
    eng.merge("a")
    with torch.no_grad():
        assert (model(x).float() - only_a.float()).abs().max().item() <= tol
    eng.unmerge()
    eng.unload()
    with torch.no_grad():
        assert torch.equal(model(x), base)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in pristine.items())


def test_cuda_peft_parity(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflight.engine.peft_io import from_peft

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=120
    )
    base = LlamaForCausalLM(cfg).eval().to("cuda")
    ours = copy.deepcopy(base)
    pm = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.eval()
    pm.save_pretrained(tmp_path)
    Engine(ours).load(from_peft(tmp_path, name="p"))
    x = torch.randint(0, 120, (2, 7), device="cuda")
    with torch.no_grad():
        assert (ours(x).logits - pm(x).logits).abs().max().item() <= 1e-4
