"""The tiny chat Llama, three PEFT LoRA adapters on it (random non-zero B), the same adapters as
engine cards (through `peft_io.from_peft`: the bytes PEFT saved), and the PEFT reference: a request
run alone, step by step, through plain Hugging Face forwards of the `PeftModel`."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from loraflight.engine import Engine
from loraflight.engine.card import CardMeta
from loraflight.engine.generate.models import CausalLM, encode_prompt, tiny_chat_llama
from loraflight.engine.generate.scheduler import GenerationScheduler
from loraflight.engine.peft_io import from_peft

TOL = 1e-4
ADAPTERS = ("alpha", "beta", "gamma")
CONFIGS = {
    "alpha": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "beta": LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"], init_lora_weights=False
    ),
    "gamma": LoraConfig(
        r=6,
        lora_alpha=6,
        target_modules=["q_proj", "up_proj", "gate_proj"],
        use_rslora=True,
        init_lora_weights=False,
    ),
}
DESCRIPTIONS = {
    "alpha": "french cooking recipes sauces and pastry",
    "beta": "python programming errors and tracebacks",
    "gamma": "astronomy telescopes planets and stars",
}
PROMPTS = (
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "a",
    "adapters share one forward",
    "tokens per second on two cores",
    "once upon a time there was a model",
    "why",
    "mixed rows with padding and masks",
)


@dataclasses.dataclass
class Rig:
    lm: CausalLM  # the model the engine wraps
    engine: Engine
    peft: Any  # PeftModel over an identical copy of the base, with the same adapters
    cards: dict[str, Any]

    def scheduler(self, **kw: Any) -> GenerationScheduler:
        return GenerationScheduler.for_engine(self.engine, self.lm, **kw)

    def ids(self, text: str) -> list[int]:
        return encode_prompt(self.lm.tokenizer, text)


def build_rig(tmp_path: Path, *, seed: int = 0, adapters: Sequence[str] = ADAPTERS) -> Rig:
    lm = tiny_chat_llama(seed)
    base = copy.deepcopy(lm.model)
    torch.manual_seed(1234)
    pm = None
    for name in (*adapters, "alpha2"):  # alpha2: a second version of alpha (other weights)
        cfg = copy.deepcopy(CONFIGS[name.rstrip("2")])
        if pm is None:
            pm = get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    assert pm is not None
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    # PEFT saves each non-default adapter in a sub-folder named after it
    cards = {
        n: from_peft(tmp_path / "peft" / n, meta=CardMeta(n, description=DESCRIPTIONS[n])) for n in adapters
    }
    # not loaded: the hot-swap tests load it over alpha@1 (PEFT's reference for it: "alpha2")
    cards["alpha@2"] = from_peft(
        tmp_path / "peft" / "alpha2", meta=CardMeta("alpha", version=2, description="v2")
    )
    engine = Engine(lm.model)
    for n in adapters:
        engine.load(cards[n], activate=False)
    return Rig(lm=lm, engine=engine, peft=pm, cards=cards)


def peft_alone(
    rig: Rig, adapter: str | None, prompt_ids: Sequence[int], max_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities: the request alone through the PeftModel,
    one plain forward over the whole sequence per step (no cache), EOS ending it."""
    pm = rig.peft
    eos = set(rig.lm.eos_token_ids)
    seq = list(prompt_ids)
    toks: list[int] = []
    lps: list[float] = []

    def step() -> torch.Tensor:
        with torch.no_grad():
            return pm(input_ids=torch.tensor([seq])).logits[0, -1].float()

    for _ in range(max_tokens):
        if adapter is None:
            with pm.disable_adapter():
                logits = step()
        else:
            pm.set_adapter(adapter)
            logits = step()
        tok = int(torch.argmax(logits))
        toks.append(tok)
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        if tok in eos:
            break
        seq.append(tok)
    return toks, lps


def max_diff(a: Sequence[float], b: Sequence[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


__all__ = ["ADAPTERS", "DESCRIPTIONS", "PROMPTS", "TOL", "Rig", "build_rig", "max_diff", "peft_alone"]
