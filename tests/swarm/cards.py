"""Format-2 test cards of many small pieces (a writer would put them in one 4 MiB piece)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from loraflight.engine.card import LoRACard, ModuleLoRA, header_digest
from loraflight.engine.card.batches import to_batches
from loraflight.engine.card.pieces import pieces_of


def pieced_card(
    name: str = "swarm",
    version: int = 1,
    *,
    pieces: int = 8,
    piece_bytes: int = 64 << 10,
    key: Any = None,
    seed: int = 0,
    base_model: str | None = "tiny-base",
) -> LoRACard:
    """A float32 card of `pieces` pieces (one module each) of about `piece_bytes` tensor bytes."""
    rng = np.random.default_rng(seed + 1000 * version)
    rank = 4
    feat = max(piece_bytes // (2 * rank * 4), 1)
    mods = [
        ModuleLoRA(
            f"layers.{i}.proj",
            rank,
            8.0,
            rng.standard_normal((rank, feat), dtype=np.float32),
            rng.standard_normal((feat, rank), dtype=np.float32),
        )
        for i in range(pieces)
    ]
    plain = LoRACard.build(
        mods, name=name, version=version, base_model=base_model, created="2026-01-01T00:00:00Z"
    )
    groups = [[m] for m in mods]
    header = dataclasses.replace(plain.header, pieces=pieces_of(groups, "float32"), digest="")
    header = dataclasses.replace(header, digest=header_digest(header))
    card = LoRACard(header, to_batches(mods, header, groups))
    return card.sign(key) if key is not None else card


__all__ = ["pieced_card"]
