"""What the node needs from an engine (`NodeEngine`, a Protocol) and `build_engine`,
which makes one from `engine.base_model`; the node itself builds a `ServingModel`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from loraflight.engine.card import LoRACard

Resolver = Callable[[str], Path | None]


class NodeEngine(Protocol):
    """The calls a node makes on its engine (`loraflight.engine.Engine` is one).

    An optional `base_model` attribute (a string) names the model it runs: cards for
    another base model are not offered to it.
    """

    def load(
        self, card: LoRACard, *, trust: Iterable[str] | None = None, resolver: Resolver | None = None
    ) -> Any:
        """Load (or swap in place) the adapter of `card`; lineage parents come from `resolver`."""
        ...

    def unload(self, name: str) -> Any:
        """Remove the adapter loaded under `name`."""
        ...


def build_engine(spec: str, device: str = "cpu", model_id: str = "") -> NodeEngine:
    """An `engine.Engine` around the base model named by `engine.base_model` (no tokenizer kept:
    a node that serves builds a `ServingModel` with `build_serving_model` instead)."""
    from loraflight.engine.authoring.serving_model import build_serving_model

    engine: NodeEngine = build_serving_model(spec, device=device, model_id=model_id).engine
    return engine


__all__ = ["NodeEngine", "Resolver", "build_engine"]
