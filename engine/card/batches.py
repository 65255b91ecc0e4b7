"""Record batches: module rows, the structural checks of a batch, building batches from rows.

`batch_runs` checks record batches (Arrow's full validation, row fields against the limits,
each row's value counts against its shape) without reading a tensor byte, and returns a
`BatchRun` per batch: the row fields as lists plus all A (all B) values of the batch as one flat
zero-copy array. `to_batches` lays rows out into batches of about `BATCH_TARGET_BYTES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from loraflight.errors import CardError

from .header import ARROW_VALUE_TYPES, DTYPES, METADATA_KEY, CardHeader, card_schema, check_rows, lora_scale

BATCH_TARGET_BYTES = 4 << 20  # 4 MiB record batches: Flight's sweet spot here


# --------------------------------------------------------------------------- module rows


@dataclasses.dataclass(frozen=True)
class ModuleLoRA:
    """One adapted Linear: A (rank, in_features) and B (out_features, rank) as numpy arrays.

    For bfloat16 cards the arrays hold the raw 16-bit words (dtype uint16).
    Arrays of an opened card are read-only views into the mapped file.
    """

    module: str
    rank: int
    alpha: float
    a: np.ndarray
    b: np.ndarray

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    def scale(self, scaling: str) -> float:
        """This row's LoRA scale under the card's `scaling` (see `lora_scale`)."""
        return lora_scale(self.alpha, self.rank, scaling)


def contiguous(a: np.ndarray) -> np.ndarray:
    """`a` itself when C-contiguous, else a contiguous copy."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


# --------------------------------------------------------------------------- batches


def column_values(
    col: pa.ListArray, npdt: np.dtype[Any], n: int, label: str
) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, the flat values) of a list column, both zero-copy numpy views."""
    try:
        offs = col.offsets.to_numpy()
        vals = col.values.to_numpy()
    except (pa.ArrowException, ValueError) as e:
        raise CardError(f"{label}: cannot view the column without copying: {e}") from None
    if len(offs) != n + 1:
        raise CardError(f"{label}: {len(offs)} offsets for {n} rows")
    if vals.dtype != npdt:
        raise CardError(f"{label}: values are {vals.dtype}, expected {npdt}")
    if n and (offs[0] < 0 or offs[-1] > len(vals)):
        raise CardError(f"{label}: offsets point past the data buffer")
    if vals.size and not vals.flags.aligned:
        raise CardError(f"{label}: tensor data is not aligned to its {npdt.itemsize}-byte element size")
    return offs, vals


class BatchRun:
    """One record batch's rows after the structural checks: the row fields as Python lists, and
    all A values (all B values) of the batch as one flat zero-copy array, rows end to end;
    `oa`/`ob` are each row's start in it (plus the end). Rows as `ModuleLoRA` are built on demand.
    """

    __slots__ = ("alphas", "fins", "flat_a", "flat_b", "fouts", "names", "oa", "ob", "ranks")

    def __init__(
        self,
        names: list[str],
        ranks: list[int],
        alphas: list[float],
        fins: list[int],
        fouts: list[int],
        oa: list[int],
        ob: list[int],
        flat_a: np.ndarray,
        flat_b: np.ndarray,
    ) -> None:
        self.names, self.ranks, self.alphas, self.fins, self.fouts = names, ranks, alphas, fins, fouts
        self.oa, self.ob, self.flat_a, self.flat_b = oa, ob, flat_a, flat_b

    def rows(self) -> list[ModuleLoRA]:
        # A frozen dataclass's __init__ sets each field through object.__setattr__; filling
        # __dict__ directly builds the same object at a third of the cost.
        new = object.__new__
        fa, fb, oa, ob = self.flat_a, self.flat_b, self.oa, self.ob
        out: list[ModuleLoRA] = []
        for i, name in enumerate(self.names):
            r, fi, fo = self.ranks[i], self.fins[i], self.fouts[i]
            row = new(ModuleLoRA)
            row.__dict__.update(
                module=name,
                rank=r,
                alpha=self.alphas[i],
                a=fa[oa[i] : oa[i + 1]].reshape(r, fi),
                b=fb[ob[i] : ob[i + 1]].reshape(fo, r),
            )
            out.append(row)
        return out

    def shapes_a(self) -> list[tuple[int, int]]:
        return list(zip(self.ranks, self.fins, strict=True))

    def shapes_b(self) -> list[tuple[int, int]]:
        return list(zip(self.fouts, self.ranks, strict=True))


def batch_rows(batch: pa.RecordBatch, dtype: str) -> list[ModuleLoRA]:
    """Structural checks of one batch and zero-copy numpy views of its rows."""
    return batch_run(batch, dtype).rows()


def batch_run(batch: pa.RecordBatch, dtype: str) -> BatchRun:
    """Structural checks of one batch (no tensor byte is read); its rows as a `BatchRun`."""
    return batch_runs([batch], dtype)[0]


def batch_runs(batches: Sequence[pa.RecordBatch], dtype: str) -> list[BatchRun]:
    """Structural checks of record batches of one schema (no tensor byte is read); their rows.

    Arrow's full validation and the value columns are checked batch by batch; the row fields
    (names, ranks, alphas, shapes against the limits) and each row's value counts against its
    shape are checked once over the rows of all batches, vectorised (a card's open does one
    pass per column, not one per batch).
    """
    for batch in batches:
        try:
            # Arrow's full validation (offsets monotonic and in bounds, UTF-8 valid) is what makes
            # the views below safe; it is cheap (no tensor byte is read); batches may come from a peer.
            batch.validate(full=True)
        except (pa.ArrowException, ValueError) as e:
            raise CardError(f"record batch is corrupt: {e}") from None
        if batch.num_columns != 7:
            raise CardError(f"record batch has {batch.num_columns} columns; a card has 7")
    if not batches:
        return []
    try:
        cols = pa.Table.from_batches(batches).columns
    except (pa.ArrowException, ValueError) as e:
        raise CardError(f"record batches of different schemas: {e}") from None
    for i, c in enumerate(cols):
        if c.null_count:
            raise CardError(f"column {batches[0].schema.field(i).name!r} has nulls; a card has none")
    modules = cols[0].to_pylist()
    nums = [c.to_numpy() for c in cols[1:5]]
    rl, al, fil, fol = (x.tolist() for x in nums)
    if modules:
        check_rows(modules, rl, al, fil, fol)
    npdt = DTYPES[dtype]
    views = []
    for k, batch in enumerate(batches):
        n = batch.num_rows
        views.append(
            (
                column_values(cols[5].chunk(k), npdt, n, "lora_a"),
                column_values(cols[6].chunk(k), npdt, n, "lora_b"),
            )
        )
    if modules:
        want_a = nums[0].astype(np.int64) * nums[2]
        want_b = nums[3] * nums[0]
        got_a = np.concatenate([oa[1:] - oa[:-1] for (oa, _), _ in views])
        got_b = np.concatenate([ob[1:] - ob[:-1] for _, (ob, _) in views])
        bad = np.flatnonzero((got_a != want_a) | (got_b != want_b))
        if bad.size:  # the first row to report
            i = int(bad[0])
            label, got, shape = (
                ("lora_a", got_a[i], (rl[i], fil[i]))
                if got_a[i] != want_a[i]
                else ("lora_b", got_b[i], (fol[i], rl[i]))
            )
            raise CardError(
                f"module {modules[i]!r}: {label} holds {got} values but its shape {shape} needs "
                f"{shape[0] * shape[1]} (shape disagrees with its bytes)"
            )
    runs = []
    first = 0
    for (oa, fa), (ob, fb) in views:
        n = len(oa) - 1
        end = first + n
        runs.append(
            BatchRun(
                modules[first:end],
                rl[first:end],
                al[first:end],
                fil[first:end],
                fol[first:end],
                (oa - oa[0]).tolist(),
                (ob - ob[0]).tolist(),
                fa[oa[0] : oa[-1]],
                fb[ob[0] : ob[-1]],
            )
        )
        first = end
    return runs


def group_rows(mods: Sequence[ModuleLoRA]) -> list[list[ModuleLoRA]]:
    """The writer's layout: a new batch whenever the next row would pass BATCH_TARGET_BYTES."""
    groups: list[list[ModuleLoRA]] = [[]]
    size = 0
    for m in mods:
        nb = m.a.nbytes + m.b.nbytes
        if groups[-1] and size + nb > BATCH_TARGET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(m)
        size += nb
    return groups


def to_batches(
    mods: Sequence[ModuleLoRA], header: CardHeader, groups: Sequence[Sequence[ModuleLoRA]] | None = None
) -> list[pa.RecordBatch]:
    """Rows as record batches (`groups`, one per batch; by default `group_rows(mods)`)."""
    schema = card_schema(header.dtype, {METADATA_KEY: header.to_json()})
    value_type = ARROW_VALUE_TYPES[header.dtype]
    if groups is None:
        groups = group_rows(mods)
    batches = []
    for g in groups:
        cols: list[pa.Array] = [
            pa.array([m.module for m in g], pa.utf8()),
            pa.array([m.rank for m in g], pa.int32()),
            pa.array([m.alpha for m in g], pa.float64()),
            pa.array([m.in_features for m in g], pa.int64()),
            pa.array([m.out_features for m in g], pa.int64()),
        ]
        for get in (lambda m: m.a, lambda m: m.b):
            parts = [np.ascontiguousarray(get(m)).reshape(-1) for m in g]
            off = np.zeros(len(g) + 1, dtype=np.int32)
            np.cumsum([p.size for p in parts], out=off[1:])
            if off[-1] >= 2**31 - 1:
                raise CardError("one record batch would exceed 2^31 values; reduce module sizes")
            flat = np.concatenate(parts) if parts else np.empty(0, DTYPES[header.dtype])
            values = pa.array(flat.view(DTYPES[header.dtype]), type=value_type)
            cols.append(
                pa.ListArray.from_arrays(pa.array(off, pa.int32()), values, type=schema.field(len(cols)).type)
            )
        batches.append(pa.record_batch(cols, schema=schema))
    return batches


__all__ = [
    "BATCH_TARGET_BYTES",
    "BatchRun",
    "ModuleLoRA",
    "batch_rows",
    "batch_run",
    "batch_runs",
    "column_values",
    "contiguous",
    "group_rows",
    "to_batches",
]
