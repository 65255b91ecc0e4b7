"""Shared pieces of the serving tests: a tiny served model, cards made here, references."""

from __future__ import annotations

import numpy as np

from loraflight.engine import LoRACard, ModuleLoRA
from loraflight.engine.authoring.serving_model import TINY_ID, ServingModel, build_serving_model
from loraflight.federation.serving.encoder import encode_rows

HIDDEN, LAYERS = 64, 2
TOL = 1e-5


def tiny() -> ServingModel:
    return build_serving_model("tiny:0")


def card(name: str, version: int, seed: int, description: str = "", scale: float = 0.6) -> LoRACard:
    """A rank-4 card on every query/value projection of the tiny encoder."""
    rng = np.random.default_rng(seed)
    mods = []
    for i in range(LAYERS):
        for proj in ("query", "value"):
            mods.append(
                ModuleLoRA(
                    f"encoder.layer.{i}.attention.self.{proj}",
                    4,
                    4.0,
                    (rng.standard_normal((4, HIDDEN)) * scale).astype(np.float32),
                    (rng.standard_normal((HIDDEN, 4)) * scale).astype(np.float32),
                )
            )
    return LoRACard.build(mods, name=name, version=version, base_model=TINY_ID, description=description)


class Reference:
    """Each input run alone, in-process, on a separate engine with the card (or the base)."""

    def __init__(self) -> None:
        self.sm = tiny()
        self._cache: dict[tuple[str | None, str], np.ndarray] = {}

    def __call__(self, c: LoRACard | None, text: str) -> np.ndarray:
        key = (None if c is None else c.digest, text)
        got = self._cache.get(key)
        if got is None:
            eng = self.sm.engine
            name = None
            if c is not None:
                name = "ref"
                if eng.adapters.get("ref", {}).get("digest") != c.digest:
                    eng.load(c, name="ref")
            ids = self.sm.tokenizer([text])["input_ids"]
            got = self._cache[key] = encode_rows(self.sm, ids, [name])[0]
        return got


def max_diff(a: object, b: object) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


__all__ = ["HIDDEN", "TOL", "Reference", "card", "max_diff", "tiny"]
