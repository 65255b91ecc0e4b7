"""Value rules: the card's storage dtype for an array, and the finite-value check.

`FiniteScan` is the one scan for NaN/Inf (per chunk an OR reduction, and the exact two integer
max reductions only where the OR cannot rule them out; no scratch); `all_finite` runs it over an
array, and format-2 verify runs it chunk by chunk beside the hash (`pieces.hash_scan`).
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
# positive threshold, negative threshold, exponent mask).
_NONFINITE: dict[str, tuple[np.dtype[Any], np.dtype[Any], int, int, int]] = {
    "float32": (np.dtype("<i4"), np.dtype("<u4"), 0x7F800000, 0xFF800000, 0x7F800000),
    "float16": (np.dtype("<i2"), np.dtype("<u2"), 0x7C00, 0xFC00, 0x7C00),
    "bfloat16": (np.dtype("<i2"), np.dtype("<u2"), 0x7F80, 0xFF80, 0x7F80),
}
FINITE_CHUNK_BYTES = 2 << 20  # bytes per step: a core's L2 here, so a second read of the chunk hits the cache


class FiniteScan:
    """The NaN/Inf scan of one flat array, chunk by chunk (`check(start, stop)`, in elements).

    Each chunk is first OR-reduced (one pass, cheaper than the two max reductions): a NaN or
    Inf word has every exponent bit set, so when the OR of the chunk's words lacks one of
    them, no word in it can be NaN or Inf. Only a chunk whose OR shows all exponent bits (a
    NaN, or values large enough to set the top exponent bit beside others covering the rest)
    gets the exact two-max check, and from then on the rest of the array gets the exact check
    directly, so values that defeat the OR cost one extra pass at most. Exact either way.
    """

    __slots__ = ("_exp", "_neg", "_or", "_pos", "_signed", "_unsigned", "step")

    def __init__(self, flat: np.ndarray, dtype: str) -> None:
        sdt, udt, self._pos, self._neg, self._exp = _NONFINITE[dtype]
        self._signed, self._unsigned = flat.view(sdt), flat.view(udt)
        self._or = True
        self.step = max(1, FINITE_CHUNK_BYTES // flat.itemsize)  # elements per chunk

    def check(self, start: int, stop: int) -> bool:
        """True when elements [start, stop) hold no NaN or Inf."""
        words = self._unsigned[start:stop]
        if words.size == 0:
            return True
        if self._or:
            if int(np.bitwise_or.reduce(words)) & self._exp != self._exp:
                return True
            self._or = False  # values that set every exponent bit: the exact check from here
        return int(self._signed[start:stop].max()) < self._pos and int(words.max()) < self._neg


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
    """True when no element is NaN or Inf (`FiniteScan` over the array, chunk by chunk)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    scan = FiniteScan(flat, dtype)
    step = scan.step
    return all(scan.check(i, i + step) for i in range(0, flat.size, step))


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


__all__ = ["FINITE_CHUNK_BYTES", "FiniteScan", "all_finite", "as_storage", "check_finite"]
