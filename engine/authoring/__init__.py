"""Skill authoring and routing: train, extract and compose cards; route queries to them.

Public API (torch loads on first use of a torch-backed name, so importing this package is light):

- train: `TrainConfig` (config), `load_dataset` (records), `train_card`, `evaluate`, `TrainResult`,
  `ParamReport`, `LoRAInjection`, `builtin_dataset`, `demo_config`
- every authoring entry point takes the card's name and description as one
  `loraflight.engine.card.CardMeta` (``meta=``; ``name=`` alone is its shorthand)
- extract: `extract_card`, `ExtractResult`, `ModuleExtraction`
- compose: `compose_add`, `compose_interpolate`, `make_child`, `delta_weights`
- router: `Router`, `Route`, `MiniLMEmbedder`, `HashingEmbedder`, `default_embedder`, `route_accuracy`
- models: `load_minilm`, `minilm_path`, `tiny_encoder`, `tiny_llama`, `encode`, `mean_pool`
"""

from __future__ import annotations

from .compose import compose_add, compose_interpolate, delta_weights, make_child
from .config import TrainConfig
from .data import builtin_dataset, demo_config, router_labelled_set
from .extract import ExtractResult, ModuleExtraction, extract_card
from .models import encode, load_minilm, mean_pool, minilm_path, tiny_encoder, tiny_llama
from .records import load_dataset
from .router import HashingEmbedder, MiniLMEmbedder, Route, Router, default_embedder, route_accuracy
from .train import LoRAInjection, ParamReport, TrainResult, evaluate, train_card

__all__ = [
    "ExtractResult",
    "HashingEmbedder",
    "LoRAInjection",
    "MiniLMEmbedder",
    "ModuleExtraction",
    "ParamReport",
    "Route",
    "Router",
    "TrainConfig",
    "TrainResult",
    "builtin_dataset",
    "compose_add",
    "compose_interpolate",
    "default_embedder",
    "delta_weights",
    "demo_config",
    "encode",
    "evaluate",
    "extract_card",
    "load_dataset",
    "load_minilm",
    "make_child",
    "mean_pool",
    "minilm_path",
    "route_accuracy",
    "router_labelled_set",
    "tiny_encoder",
    "tiny_llama",
    "train_card",
]
