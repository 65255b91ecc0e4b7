"""The old home of the torch adapter: now `loraflight.engine.card.torch`.

Kept only so `engine/_engine.py` and its tests keep importing until they switch to
`loraflight.engine.card.torch`; then this file goes.
"""

from __future__ import annotations

from .card.torch import (
    TORCH_DTYPES,
    card_from_tensors,
    card_tensors,
    card_views,
    copy_card_tensors,
    dtype_name,
    model_fingerprint,
    model_shapes,
    resolve_linear,
    split_views,
    tensor_to_numpy,
)

__all__ = [
    "TORCH_DTYPES",
    "card_from_tensors",
    "card_tensors",
    "card_views",
    "copy_card_tensors",
    "dtype_name",
    "model_fingerprint",
    "model_shapes",
    "resolve_linear",
    "split_views",
    "tensor_to_numpy",
]
