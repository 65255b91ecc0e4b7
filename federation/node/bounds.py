"""The `[limits]` keys of a NodeConfig as the Flight server's `Limits` and the client's read
bounds (the one place that maps one to the other)."""

from __future__ import annotations

from typing import Any

from ..config import NodeConfig
from ..server import Limits


def server_limits(cfg: NodeConfig) -> Limits:
    """The server's bounds from `limits.*` (the rest keep `Limits`' defaults)."""
    lim = cfg.limits
    return Limits(
        max_card_bytes=lim.max_card_bytes,
        max_concurrent_gets=lim.get_slots,
        gets_per_client=lim.gets_per_client,
        get_wait_s=lim.get_wait,
        stall_s=lim.stall,
        max_concurrent_puts=lim.put_slots,
        puts_per_client=lim.puts_per_client,
        put_idle_s=lim.put_idle,
        put_deadline_s=lim.put_deadline,
    )


def client_bounds(cfg: NodeConfig) -> dict[str, Any]:
    """Keyword arguments for every `Client` the node makes to a peer."""
    return {"read_timeout": cfg.limits.read_timeout, "max_card_bytes": cfg.limits.max_card_bytes}


__all__ = ["client_bounds", "server_limits"]
