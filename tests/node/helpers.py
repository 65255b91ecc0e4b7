"""Shared helpers of the node tests and the propagation benchmark: small cards for the
tiny built-in encoder, node configs on loopback, bounded waits."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loraflight.engine.card import LoRACard, ModuleLoRA
from loraflight.federation.config import NodeConfig, load_config

TINY_BASE = "loraflight/tiny-encoder"


def tiny_card(
    name: str = "skill",
    version: int = 1,
    *,
    key: Any = None,
    hidden: int = 64,
    layers: int = 2,
    rank: int = 4,
    seed: int = 0,
    base_model: str | None = TINY_BASE,
    pad_to_bytes: int = 0,
) -> LoRACard:
    """A card for `engine.authoring.models.tiny_encoder` (query/value of every layer), signed by `key`.

    `pad_to_bytes` raises the rank of the first module until the card holds about that many bytes
    of tensors (for transfer benchmarks; such a card still loads into the same model).
    """
    rng = np.random.default_rng(seed)
    mods = []
    targets = [f"encoder.layer.{i}.attention.self.{p}" for i in range(layers) for p in ("query", "value")]
    for t in targets:
        r = rank
        if pad_to_bytes and t == targets[0]:
            r = max(rank, pad_to_bytes // (4 * 2 * hidden))
        a = (rng.standard_normal((r, hidden)) * 0.05).astype(np.float32)
        b = (rng.standard_normal((hidden, r)) * 0.05).astype(np.float32)
        mods.append(ModuleLoRA(t, r, float(2 * r), a, b))
    card = LoRACard.build(
        mods, name=name, version=version, base_model=base_model, description=f"{name} test card"
    )
    return card.sign(key) if key is not None else card


def node_config(store: Path, fleet: str, **flags: Any) -> NodeConfig:
    """A validated loopback config with short intervals (flags use dotted keys)."""
    base = {
        "store": str(store),
        "listen": "grpc://127.0.0.1:0",
        "fleet": fleet,
        "discovery.interfaces": ["127.0.0.1"],
        "intervals.health": 0.5,
        "intervals.health_timeout": 1.0,
        "intervals.failures": 2,
        "intervals.probe": 0.5,
        "intervals.poll": 30.0,
    }
    base.update(flags)
    return load_config(env={}, flags=base)


def wait_for(
    pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll `pred` until it returns something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
