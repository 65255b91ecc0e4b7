"""Format-2 test cards of many small pieces (a writer would put them in one 4 MiB piece)."""

from __future__ import annotations

import dataclasses
from typing import Any

from loraflight.engine.card import LoRACard, header_digest
from loraflight.engine.card.batches import to_batches
from loraflight.engine.card.pieces import pieces_of
from loraflight.testing import make_card


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
    plain = make_card(
        name, version, nbytes=piece_bytes * pieces, modules=pieces, seed=seed, base_model=base_model
    )
    mods = plain.modules
    groups = [[m] for m in mods]
    header = dataclasses.replace(plain.header, pieces=pieces_of(groups, "float32"), digest="")
    header = dataclasses.replace(header, digest=header_digest(header))
    card = LoRACard(header, to_batches(mods, header, groups))
    return card.sign(key) if key is not None else card


__all__ = ["pieced_card"]
