"""loraflight.engine: the `.lora.arrow` card format and the PyTorch side.

`loraflight.engine.card` and this package import no torch; `Engine` and the authoring
tools load torch on first use.
"""

from __future__ import annotations

from typing import Any

from .card import CardHeader, LoRACard, ModuleLoRA, Verification, base_fingerprint, open_card

_LAZY = {
    "Engine": ("loraflight.engine._engine", "Engine"),
}


def __getattr__(name: str) -> Any:
    # torch-backed names load on first use so `import loraflight.engine` stays light.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'loraflight.engine' has no attribute {name!r}")


__all__ = [
    "CardHeader",
    "Engine",
    "LoRACard",
    "ModuleLoRA",
    "Verification",
    "base_fingerprint",
    "open_card",
]
