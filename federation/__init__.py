"""loraflight federation: store, Flight server and client, discovery, sync, node, CLI.

Imports no torch and never grpcio at module load (a relay node runs without torch).
The public API is what `__all__` lists; names load on first use so `import federation`
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Store": "federation.store",
    "StagedCard": "federation.store",
    "CardServer": "federation.server",
    "Limits": "federation.server",
    "run_server": "federation.server",
    "Client": "federation.client",
    "ClientTLS": "federation.security",
    "ServerTLS": "federation.security",
    "load_tokens": "federation.security",
    "SyncPolicy": "federation.sync",
    "SyncReport": "federation.sync",
    "SyncProgress": "federation.sync",
    "Fetch": "federation.sync",
    "plan_sync": "federation.sync",
    "sync": "federation.sync",
    "CatalogEntry": "federation.protocol",
    "Criteria": "federation.protocol",
    "CardNotFound": "federation.protocol",
    "PROTOCOL_VERSION": "federation.protocol",
    "NodeIdentity": "federation.identity",
    "TrustedKey": "federation.trust",
}

if TYPE_CHECKING:
    from .client import Client
    from .identity import NodeIdentity
    from .protocol import PROTOCOL_VERSION, CardNotFound, CatalogEntry, Criteria
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
