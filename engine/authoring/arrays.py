"""numpy conversions between a card's stored dtype and float32/float64 (no torch)."""

from __future__ import annotations

import numpy as np

from ..card import DTYPES


def to_float(arr: np.ndarray, dtype: str, out: type = np.float64) -> np.ndarray:
    """A card array (bfloat16 as uint16 words) as float64 (or `out`)."""
    if dtype == "bfloat16":
        return (np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(out)
    return np.asarray(arr).astype(out)


def from_float(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float array -> the card's stored dtype; bfloat16 rounds to nearest even, kept as uint16 words."""
    if dtype == "bfloat16":
        f = np.ascontiguousarray(arr, dtype=np.float32)
        bits = f.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        words = rounded.astype(np.uint16)
        nan = np.isnan(f)
        if nan.any():
            words[nan] = 0x7FC0
        return words
    return np.ascontiguousarray(arr, dtype=DTYPES[dtype])


__all__ = ["from_float", "to_float"]
