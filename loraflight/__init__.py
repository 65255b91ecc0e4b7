"""loraflight: share LoRA adapter cards across a fleet, hot-load them, serve them.

The one installed namespace: `loraflight.engine` (the folder `engine/`: the card format
and the PyTorch side) and `loraflight.federation` (the folder `federation/`: store,
Flight server and client, discovery, sync, node, CLI). This module re-exports what a
user needs in one hop. Names load on first use, so `import loraflight` loads neither
torch nor pyarrow's Flight until a name that needs them is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AuthError,
    BusyError,
    CardError,
    CardNotFound,
    ConfigError,
    ConflictError,
    EngineError,
    LoraflightError,
    PeerError,
    StoreError,
    TrainingError,
    TrustError,
)

# name -> the module that defines it (imported on first attribute access)
_LAZY = {
    "LoRACard": "loraflight.engine.card",
    "CardHeader": "loraflight.engine.card",
    "open_card": "loraflight.engine.card",
    "Engine": "loraflight.engine._engine",
    "to_peft": "loraflight.engine.peft_io",
    "from_peft": "loraflight.engine.peft_io",
    "generate_key": "loraflight.engine.keys",
    "write_keypair": "loraflight.engine.keys",
    "load_private": "loraflight.engine.keys",
    "load_public": "loraflight.engine.keys",
    "Node": "loraflight.federation.node",
    "NodeConfig": "loraflight.federation.config",
    "load_config": "loraflight.federation.config",
    "Client": "loraflight.federation.client",
    "Store": "loraflight.federation.store",
}
# names whose attribute in the defining module differs
_RENAMED = {"generate_key": "generate"}

if TYPE_CHECKING:
    from .engine._engine import Engine
    from .engine.card import CardHeader, LoRACard, open_card
    from .engine.keys import generate as generate_key
    from .engine.keys import load_private, load_public, write_keypair
    from .engine.peft_io import from_peft, to_peft
    from .federation.client import Client
    from .federation.config import NodeConfig, load_config
    from .federation.node import Node
    from .federation.store import Store


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'loraflight' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AuthError",
    "BusyError",
    "CardError",
    "CardHeader",
    "CardNotFound",
    "Client",
    "ConfigError",
    "ConflictError",
    "Engine",
    "EngineError",
    "LoRACard",
    "LoraflightError",
    "Node",
    "NodeConfig",
    "PeerError",
    "Store",
    "StoreError",
    "TrainingError",
    "TrustError",
    "__version__",
    "from_peft",
    "generate_key",
    "load_config",
    "load_private",
    "load_public",
    "open_card",
    "to_peft",
    "write_keypair",
]
