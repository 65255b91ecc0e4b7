"""Texts to embeddings on a `ServingModel`: tokenize, one mixed-adapter forward, pool.

`tokenize` runs at admission (the context check answers 400 before anything is queued);
`encode_rows` runs one forward for a batch whose rows may each use another adapter (the
engine's mixed rows: ``row_names[i]`` is a lease row or None for the base) and pools as the
model's sentence-transformers config asks. Results are float32 numpy rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import Failure, context_length_exceeded


def tokenize(model: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]] | Failure:
    """Token ids per text (special tokens included), or the 400 for the first one too long."""
    enc = model.tokenizer(list(texts), add_special_tokens=True, truncation=False)
    ids = [list(x) for x in enc["input_ids"]]
    for i, x in enumerate(ids):
        if len(x) > max_tokens:
            return context_length_exceeded(i, len(x), max_tokens)
    return ids


def encode_rows(model: Any, ids: Sequence[Sequence[int]], row_names: Sequence[str | None]) -> np.ndarray:
    """(len(ids), dim) float32 embeddings: one forward, row i on adapter row_names[i]."""
    import torch

    n = len(ids)
    width = max(len(x) for x in ids)
    pad = model.pad_token_id
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    dev = model.device
    input_ids, mask = input_ids.to(dev), mask.to(dev)
    with torch.inference_mode():
        out = model.engine.forward_mixed(list(row_names), input_ids=input_ids, attention_mask=mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = model.pooling.apply(hidden, mask)
    return np.ascontiguousarray(pooled.float().cpu().numpy(), dtype=np.float32)


__all__ = ["encode_rows", "tokenize"]
