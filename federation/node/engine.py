"""What the node needs from an engine (`NodeEngine`, a Protocol) and `build_engine`,
which makes one from `engine.base_model`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from loraflight.engine.card import LoRACard
from loraflight.errors import ConfigError

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


def build_engine(spec: str, device: str = "cpu") -> NodeEngine:
    """An `engine.Engine` around the base model named by `engine.base_model`."""
    import re

    from loraflight.engine import Engine
    from loraflight.engine.authoring.models import load_embedding_model, tiny_encoder

    m = re.fullmatch(r"tiny(?::(\d+))?", spec)
    if m:
        model, _tok = tiny_encoder(seed=int(m.group(1) or 0))
        base = "loraflight/tiny-encoder"
    else:
        try:
            model, _tok, base = load_embedding_model(spec)
        except ConfigError:
            raise
        except (OSError, ValueError) as e:
            raise ConfigError(f"engine.base_model {spec!r} could not be loaded: {e}") from None
    if device != "cpu":
        model = model.to(device)
    engine: NodeEngine = Engine(model, base_model=base)
    return engine


__all__ = ["NodeEngine", "Resolver", "build_engine"]
