"""loraflight federation: store, Flight server and client, discovery, sync, node, CLI.

Imports no torch and never grpcio at module load (a relay node runs without torch).
The public API is what `__all__` lists; names load on first use so `import federation`
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Store": "loraflight.federation.store",
    "StagedCard": "loraflight.federation.store",
    "CardServer": "loraflight.federation.server",
    "Limits": "loraflight.federation.server",
    "run_server": "loraflight.federation.server",
    "Client": "loraflight.federation.client",
    "ClientTLS": "loraflight.federation.security",
    "ServerTLS": "loraflight.federation.security",
    "load_tokens": "loraflight.federation.security",
    "SyncPolicy": "loraflight.federation.sync",
    "SyncReport": "loraflight.federation.sync",
    "SyncProgress": "loraflight.federation.sync",
    "Fetch": "loraflight.federation.sync",
    "plan_sync": "loraflight.federation.sync",
    "sync": "loraflight.federation.sync",
    "CatalogEntry": "loraflight.federation.protocol",
    "Criteria": "loraflight.federation.protocol",
    "CardNotFound": "loraflight.errors",
    "PROTOCOL_VERSION": "loraflight.federation.protocol",
    "NodeIdentity": "loraflight.federation.identity",
    "TrustedKey": "loraflight.federation.trust",
}

if TYPE_CHECKING:
    from loraflight.errors import CardNotFound

    from .client import Client
    from .identity import NodeIdentity
    from .protocol import PROTOCOL_VERSION, CatalogEntry, Criteria
    from .security import ClientTLS, ServerTLS, load_tokens
    from .server import CardServer, Limits, run_server
    from .store import StagedCard, Store
    from .sync import Fetch, SyncPolicy, SyncProgress, SyncReport, plan_sync
    from .trust import TrustedKey


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'federation' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


# `federation.sync` is the function: importing the submodule would otherwise shadow it with the
# module object (the submodule stays importable as `federation.sync` through sys.modules).
from .sync import sync  # noqa: E402

__all__ = [
    "PROTOCOL_VERSION",
    "CardNotFound",
    "CardServer",
    "CatalogEntry",
    "Client",
    "ClientTLS",
    "Criteria",
    "Fetch",
    "Limits",
    "NodeIdentity",
    "ServerTLS",
    "StagedCard",
    "Store",
    "SyncPolicy",
    "SyncProgress",
    "SyncReport",
    "TrustedKey",
    "load_tokens",
    "plan_sync",
    "run_server",
    "sync",
]
