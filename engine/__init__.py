"""loraflight engine: the `.lora.arrow` card format and the PyTorch side.

`engine.card` and this package import no torch; `Engine` and the authoring
tools load torch on first use.
"""

from __future__ import annotations

from typing import Any

from .card import CardHeader, LoRACard, ModuleLoRA, Verification, base_fingerprint, open_card
from .errors import (
    AuthError,
    CardError,
    ConfigError,
    ConflictError,
    EngineError,
    LoraflightError,
    PeerError,
    StoreError,
    TrainingError,
    TrustError,
)

_LAZY = {
    "Engine": ("engine._engine", "Engine"),
}


def __getattr__(name: str) -> Any:
    # torch-backed names load on first use so `import engine` stays light.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "AuthError",
    "CardError",
    "CardHeader",
    "ConfigError",
    "ConflictError",
    "Engine",
    "EngineError",
    "LoRACard",
    "LoraflightError",
    "ModuleLoRA",
    "PeerError",
    "StoreError",
    "TrainingError",
    "TrustError",
    "Verification",
    "base_fingerprint",
    "open_card",
]
