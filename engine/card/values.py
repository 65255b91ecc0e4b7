"""Value rules: the card's storage dtype for an array, and the finite-value check.

`all_finite` is the one scan for NaN/Inf (two integer max reductions per chunk, no scratch);
`check_finite` applies it to a card's batch runs and names the first bad module. Both the
card (`LoRACard.check_values`) and the torch adapter (checking copies) call these.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

import numpy as np

from loraflight.errors import CardError

from .batches import BatchRun
from .header import DTYPES

# Exponent bits all ones means Inf or NaN. As words, those are the signed words at or above
# the exponent mask (positive Inf/NaN) and the unsigned words at or above mask | sign bit
# (negative Inf/NaN): two max reductions over the raw words find both, with no scratch buffer
# and no element-wise pass (numpy's max over integers is vectorised; its float16 isfinite is
# ten times slower, and bfloat16 is raw words). Per storage type: (signed word, unsigned word,
# positive threshold, negative threshold).
_NONFINITE: dict[str, tuple[np.dtype[Any], np.dtype[Any], int, int]] = {
    "float32": (np.dtype("<i4"), np.dtype("<u4"), 0x7F800000, 0xFF800000),
    "float16": (np.dtype("<i2"), np.dtype("<u2"), 0x7C00, 0xFC00),
    "bfloat16": (np.dtype("<i2"), np.dtype("<u2"), 0x7F80, 0xFF80),
}
_FINITE_CHUNK = 1 << 18  # elements per pass: the second reduction reads the chunk from cache


def as_storage(arr: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """`arr` in the card's storage dtype, never converting values between kinds.

    float32/float16 take float arrays of that width (any byte order); bfloat16 takes the raw
    16-bit words (uint16 or int16), since numpy has no bfloat16.
    """
    npdt = DTYPES[dtype]
    if dtype == "bfloat16":
        if arr.dtype.kind not in "ui" or arr.dtype.itemsize != 2:
            raise CardError(
                f"{what}: a bfloat16 card takes the raw 16-bit words as uint16, got {arr.dtype} "
                "(from torch: tensor.view(torch.uint16).numpy() or .view(torch.int16))"
            )
        return arr.view(arr.dtype.str[0] + "u2").astype(npdt, copy=False)
    if arr.dtype.kind != "f" or arr.dtype.itemsize != npdt.itemsize:
        raise CardError(f"{what}: array of {arr.dtype} does not match the card dtype {dtype}")
    return arr.astype(npdt, copy=False)


def all_finite(arr: np.ndarray, dtype: str) -> bool:
    """True when no element is NaN or Inf: per chunk, the max of the words read as signed and
    as unsigned integers against the thresholds above (the second read hits the cache)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.size == 0:
        return True
    sdt, udt, pos, neg = _NONFINITE[dtype]
    signed, unsigned = flat.view(sdt), flat.view(udt)
    for i in range(0, flat.size, _FINITE_CHUNK):
        if (
            int(signed[i : i + _FINITE_CHUNK].max()) >= pos
            or int(unsigned[i : i + _FINITE_CHUNK].max()) >= neg
        ):
            return False
    return True


def check_finite(
    runs: Iterable[BatchRun], dtype: str, *, only: Container[str] | None = None, context: str = ""
) -> None:
    """Raise CardError naming the first module (of `only`, default all) with a NaN or Inf.

    One scan per record batch and column (a batch's A matrices lie end to end); only a batch
    that fails is scanned module by module, to name the culprit. `context` prefixes the message.
    """
    for run in runs:
        if only is None and all_finite(run.flat_a, dtype) and all_finite(run.flat_b, dtype):
            continue
        for m in run.rows():
            if only is not None and m.module not in only:
                continue
            for label, arr in (("lora_a", m.a), ("lora_b", m.b)):
                if not all_finite(arr, dtype):
                    raise CardError(f"{context}module {m.module!r}: {label} has NaN or Inf values")


__all__ = ["all_finite", "as_storage", "check_finite"]
