"""Building the node's model from `engine.base_model` (or a caller's factory).

An encoder base gives a `ServingModel` (embeddings); a causal LM gives a `GenerationService`
(completions and chat, with its LM head). Heavy imports stay inside the function, so importing
the node does not load torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..config import NodeConfig

log = logging.getLogger(__name__)


def build_model(
    cfg: NodeConfig, registry: Any, factory: Callable[[NodeConfig], Any] | None = None
) -> tuple[Any, Any, Any]:
    """(serving model or None, engine, generation service or None) for this config."""
    if factory is not None:
        model = factory(cfg)
        return model, model.engine, None
    from loraflight.engine.generate.models import is_causal_spec

    log.info("loading the base model %s (engine.base_model)", cfg.engine.base_model)
    if is_causal_spec(cfg.engine.base_model):
        from loraflight.federation.serving.generation import GenerationService
        from loraflight.federation.serving.metrics import ServingMetrics

        generation = GenerationService.build(cfg.engine.base_model, cfg, metrics=ServingMetrics(registry))
        return None, generation.engine, generation
    from loraflight.engine.authoring.serving_model import build_serving_model

    model = build_serving_model(cfg.engine.base_model, device=cfg.engine.device, model_id=cfg.engine.model_id)
    return model, model.engine, None


__all__ = ["build_model"]
