"""Serving: the node answers requests with its skills (docs/serving.md).

An OpenAI-compatible HTTP API (FastAPI + uvicorn, in the node process), a cross-request
batcher that runs mixed-adapter forwards, and the Flight ``do_exchange`` ``embed`` fast path.
Names load on first use: importing this package loads neither torch nor FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ApiServer": "loraflight.federation.serving.server",
    "start_api": "loraflight.federation.serving.server",
    "start_serving": "loraflight.federation.serving.server",
    "Serving": "loraflight.federation.serving.server",
    "make_exchange_handler": "loraflight.federation.serving.exchange",
    "EmbedService": "loraflight.federation.serving.service",
    "Batcher": "loraflight.federation.serving.batcher",
    "ServingMetrics": "loraflight.federation.serving.metrics",
    "create_app": "loraflight.federation.serving.app",
}

if TYPE_CHECKING:
    from .app import create_app
    from .batcher import Batcher
    from .exchange import make_exchange_handler
    from .metrics import ServingMetrics
    from .server import ApiServer, Serving, start_api, start_serving
    from .service import EmbedService


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'loraflight.federation.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


__all__ = [
    "ApiServer",
    "Batcher",
    "EmbedService",
    "Serving",
    "ServingMetrics",
    "create_app",
    "make_exchange_handler",
    "start_api",
    "start_serving",
]
