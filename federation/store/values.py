"""Value checks and hashing of received card batches, straight from their Arrow buffers.

Pure functions of a batch: no file, no thread. The staging workers (`staging`) call them
while a card streams in; the full structural check runs on the written file at commit.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from loraflight.engine.card import CardDigest, card_schema
from loraflight.engine.card.values import all_finite
from loraflight.errors import CardError

_WORDS = {"float32": "<u4", "float16": "<u2", "bfloat16": "<u2"}


def finite_bytes(mv: memoryview, dtype: str) -> bool:
    """No NaN/Inf among the values in `mv` (any alignment): the card's own scan
    (`engine.card.all_finite`: chunked integer max reductions, no scratch buffer)."""
    return all_finite(np.frombuffer(mv, dtype=_WORDS[dtype]), dtype)


def plain_schema(dtype: str) -> pa.Schema:
    """The card schema of `dtype` without metadata (`card_schema` builds it once per dtype)."""
    return card_schema(dtype)


def _value_span(arr: pa.Array, n: int, itemsize: int, label: str) -> tuple[memoryview, np.ndarray]:
    """The bytes the `n` rows of a list column span in its values buffer (bounds-checked), and
    its `n + 1` offsets relative to the first."""
    obuf = arr.buffers()[1]
    if obuf is None or obuf.size < (arr.offset + n + 1) * 4:
        raise CardError(f"{label}: offsets buffer is missing or shorter than the row count")
    off = np.frombuffer(obuf, dtype="<i4", count=n + 1, offset=arr.offset * 4).astype(np.int64)
    values = arr.values
    vbufs = values.buffers()
    vbuf = vbufs[1] if len(vbufs) > 1 else None
    vsize = 0 if vbuf is None else vbuf.size
    lo = values.offset * itemsize + int(off[0]) * itemsize
    hi = values.offset * itemsize + int(off[n]) * itemsize
    if lo < 0 or hi < lo or hi > vsize:
        raise CardError(f"{label}: offsets point outside the values buffer (corrupt batch)")
    mv = memoryview(vbuf)[lo:hi] if vbuf is not None else memoryview(b"")
    return mv, off - off[0]


def check_batch_finite(batch: pa.RecordBatch, dtype: str) -> None:
    """Refuse a received batch holding a NaN or Inf: one vectorised pass over each tensor
    column's whole value span (any alignment); a per-row scan only to name the culprit."""
    from loraflight.engine.card import DTYPES

    if batch.num_columns != 7:
        raise CardError(f"a card batch has 7 columns, this one has {batch.num_columns}")
    n = batch.num_rows
    size = DTYPES[dtype].itemsize
    for k, label in ((5, "lora_a"), (6, "lora_b")):
        mv, off = _value_span(batch.column(k), n, size, label)
        if finite_bytes(mv, dtype):
            continue
        modules = batch.column(0).to_pylist()
        for i in range(n):
            lo, hi = int(off[i]) * size, int(off[i + 1]) * size
            if 0 <= lo <= hi and not finite_bytes(mv[lo:hi], dtype):
                raise CardError(f"module {modules[i]!r}: {label} has NaN or Inf values; refused")
        raise CardError(f"{label} has NaN or Inf values; refused")


def hash_batch(digest: CardDigest, batch: pa.RecordBatch, dtype: str, check_finite: bool = False) -> None:
    """Feed one received batch to `digest` from its raw bytes (and check values are finite).

    Buffers received over Flight are often misaligned, so this walks the Arrow buffers as
    bytes (bounds-checked against every advertised shape) instead of making numpy views;
    the full structural check runs on the written file before commit.
    """
    from loraflight.engine.card import DTYPES

    if batch.num_columns != 7:
        raise CardError(f"a card batch has 7 columns, this one has {batch.num_columns}")
    for i, c in enumerate(batch.columns):
        if c.null_count:
            raise CardError(f"column {batch.schema.field(i).name!r} has nulls; a card has none")
    n = batch.num_rows
    cols = batch.columns
    modules = cols[0].to_pylist()
    ranks, alphas, fins, fouts = (cols[k].to_pylist() for k in (1, 2, 3, 4))
    size = DTYPES[dtype].itemsize
    spans = [(*_value_span(cols[k], n, size, label), label) for k, label in ((5, "lora_a"), (6, "lora_b"))]
    for i in range(n):
        r, fi, fo = int(ranks[i]), int(fins[i]), int(fouts[i])
        parts = []
        for (mv, off, label), count in zip(spans, (r * fi, fo * r), strict=True):
            lo, hi = int(off[i]) * size, int(off[i + 1]) * size
            if off[i + 1] - off[i] != count or lo < 0 or hi > len(mv) or r < 1 or fi < 1 or fo < 1:
                raise CardError(
                    f"module {modules[i]!r}: {label} holds {int(off[i + 1] - off[i])} values for shape "
                    f"needing {count}, or points outside its buffer (corrupt batch)"
                )
            parts.append(mv[lo:hi])
        if check_finite:
            for label, part in zip(("lora_a", "lora_b"), parts, strict=True):
                if not finite_bytes(part, dtype):
                    raise CardError(f"module {modules[i]!r}: {label} has NaN or Inf values; refused")
        digest.update_row(str(modules[i]), r, float(alphas[i]), fi, fo, parts[0], parts[1])


__all__ = ["check_batch_finite", "finite_bytes", "hash_batch", "plain_schema"]
