"""Data shipped with the authoring tools: the demo skill's training set and the router's labelled set."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

DATASETS = {"ops-runbook": "ops_runbook_pairs.jsonl"}


def _read(filename: str) -> bytes:
    return resources.files(__name__).joinpath(filename).read_bytes()


def builtin_dataset(name: str = "ops-runbook") -> list[dict[str, str]]:
    """A built-in training set: "ops-runbook" = 60 contrastive pairs (alert text -> runbook action)."""
    from ..records import load_dataset, parse_jsonl

    if name not in DATASETS:
        from loraflight.errors import TrainingError

        raise TrainingError(f"no built-in dataset {name!r}; available: {', '.join(DATASETS)}")
    problems: list[str] = []
    records = [r for _, r in parse_jsonl(_read(DATASETS[name]), problems)]
    return load_dataset(records, "pairs")


def demo_config() -> Any:
    """The training config of the demo skill: MiniLM, a few seconds of CPU, held-out margin rises."""
    from ..config import TrainConfig

    return TrainConfig(
        kind="pairs",
        rank=8,
        alpha=16.0,
        target_modules=("query", "value"),
        learning_rate=2e-3,
        temperature=0.1,
        batch_size=16,
        epochs=10,
        max_steps=10,
        max_length=32,
        eval_fraction=0.3,
        seed=0,
    )


DEMO_CARD = {
    "name": "ops-runbook",
    "description": "Matches production alerts and incident symptoms to the runbook action that fixes them.",
    "tags": ("ops", "retrieval", "minilm"),
}


def router_labelled_set() -> dict[str, Any]:
    """{"cards": [{name, description}], "queries": [{query, card}]}: the router's labelled set."""
    data: dict[str, Any] = json.loads(_read("router_queries.json"))
    return data


__all__ = ["DATASETS", "DEMO_CARD", "builtin_dataset", "demo_config", "router_labelled_set"]
