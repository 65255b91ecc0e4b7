"""The engine's immutable records and the pure rules over a candidate adapter dict.

`Adapter` is one loaded adapter (its deltas already on the layers' devices); the helpers
compute lineage order, removal with auto-loaded parents, free names, and a snapshot's
per-row plan for mixed batches. No locks and no model here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

from loraflight.errors import EngineError

from ._lora import Delta, RowPlan, Snapshot
from .card import CardHeader, LoRACard

MAX_LINEAGE_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str
    ref: str
    digest: str
    version: int
    card_dtype: str
    deltas: dict[str, Delta]  # model module path -> (A, B, scale), own weights only
    parents: tuple[str, ...]  # names of direct lineage parents (loaded adapters)
    auto: bool  # loaded as someone's lineage parent
    active: bool
    last_used: float
    nbytes: int
    device: str
    dtype: str
    header: CardHeader


@dataclasses.dataclass
class Plan:
    mapping: dict[str, str]  # card module -> model module path
    targets: dict[str, tuple[torch.device, torch.dtype]]  # card module -> where its weights go


def as_card(obj: Any) -> LoRACard:
    if isinstance(obj, LoRACard):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return LoRACard.open(obj)
    raise EngineError(f"expected a LoRACard or a card file path, got {type(obj).__name__}")


def free_name(cand: dict[str, Adapter], card: LoRACard) -> str:
    for n in (card.name, card.ref, f"{card.ref}#{card.digest[:12]}"):
        if n not in cand:
            return n
    return f"{card.ref}#{card.digest}"


def lineage(cand: dict[str, Adapter], name: str) -> list[str]:
    """Ancestors first (each once), then `name`."""
    out: dict[str, None] = {}

    def visit(n: str, depth: int) -> None:
        if n in out or depth > MAX_LINEAGE_DEPTH or n not in cand:
            return
        for p in cand[n].parents:
            visit(p, depth + 1)
        out[n] = None

    visit(name, 0)
    return list(out)


def remove(cand: dict[str, Adapter], name: str) -> None:
    """Drop `name` and then every auto-loaded parent that nothing left needs."""
    cand.pop(name, None)
    for _ in range(len(cand) + 1):
        needed = {p for a in cand.values() for p in a.parents}
        orphans = [n for n, a in cand.items() if a.auto and n not in needed and not a.active]
        if not orphans:
            return
        for n in orphans:
            cand.pop(n)


def with_rows(snap: Snapshot, rows: tuple[str | None, ...]) -> Snapshot:
    if snap.merged:
        raise EngineError("mixed batches need unmerged adapters; call unmerge() first")
    names = tuple(sorted({n for n in rows if n is not None}))  # canonical: one stack memo per set
    unknown = [n for n in names if n not in snap.names]
    if unknown:
        raise EngineError(f"mixed batch names adapter(s) {unknown} that are not loaded")
    index = tuple(0 if n is None else names.index(n) + 1 for n in rows)
    return Snapshot(
        slots=snap.slots,
        merged=False,
        names=snap.names,
        rows=RowPlan(names, index),
        _stacks=snap._stacks,
        _memo_lock=snap._memo_lock,
    )


def chain_deltas(cand: dict[str, Adapter], name: str) -> dict[str, tuple[Delta, ...]]:
    """Per model module: the deltas adapter `name` applies there (lineage parents first)."""
    chain = lineage(cand, name)
    touched = dict.fromkeys(m for x in chain for m in cand[x].deltas)
    return {m: tuple(cand[x].deltas[m] for x in chain if m in cand[x].deltas) for m in touched}


def evict(
    cand: dict[str, Adapter], keep: str, max_adapters: int, used: Callable[[Adapter], float]
) -> list[str]:
    """Unload least recently used adapters from `cand` until `max_adapters` remain; the victims."""
    protect = set(lineage(cand, keep))
    out: list[str] = []
    for _ in range(len(cand) + 1):
        users = [n for n, a in cand.items() if not a.auto]
        if len(users) <= max_adapters:
            return out
        has_children = {p for a in cand.values() for p in a.parents}
        victims = [n for n in users if n not in protect and n not in has_children]
        if not victims:
            raise EngineError(
                f"cannot load {keep!r}: max_adapters={max_adapters} is reached and every loaded "
                "adapter is needed (lineage); unload one or raise max_adapters"
            )
        victim = min(victims, key=lambda n: used(cand[n]))
        remove(cand, victim)
        out.append(victim)
    return out


__all__ = [
    "MAX_LINEAGE_DEPTH",
    "Adapter",
    "Plan",
    "as_card",
    "chain_deltas",
    "evict",
    "free_name",
    "lineage",
    "remove",
    "with_rows",
]
