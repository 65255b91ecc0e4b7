"""The membership keys of a `NodeConfig` as `SwimParams` plus the runner's timings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraflight.errors import ConfigError

from ..config_checks import range_problems
from .swim import SwimParams


@dataclass(frozen=True)
class Settings:
    params: SwimParams
    probe_timeout: float  # one ping, seconds
    sync_interval: float  # anti-entropy, seconds
    gossip_interval: float = 0.2  # gossip rounds between periods while news waits, seconds


def problems(cfg: Any) -> list[str]:
    """Every problem in the `membership.*` keys of a NodeConfig (empty when they are valid)."""
    m = cfg.membership
    p: list[str] = []
    for name in ("probe_interval", "sync_interval", "gossip_interval", "suspicion_mult"):
        v = getattr(m, name)
        if not 0 < v <= 86400:
            p.append(f"membership.{name}: {v} must be > 0 and at most 86400")
    if not 0 <= m.probe_timeout <= 86400:
        p.append(f"membership.probe_timeout: {m.probe_timeout} must be 0 (intervals.health_timeout) or > 0")
    p += range_problems(
        "membership",
        m,
        (("probes", 1, 64), ("indirect", 0, 64), ("fanout", 1, 64), ("retransmit_mult", 1, 64)),
    )
    return p


def settings(cfg: Any) -> Settings:
    """`Settings` from a NodeConfig; ConfigError listing every bad `membership.*` key."""
    bad = problems(cfg)
    if bad:
        raise ConfigError("invalid membership settings:\n  " + "\n  ".join(bad))
    m = cfg.membership
    params = SwimParams(
        probe_interval=m.probe_interval,
        probes=m.probes,
        indirect=m.indirect,
        fanout=max(m.fanout, m.probes),
        suspicion_mult=m.suspicion_mult,
        retransmit_mult=m.retransmit_mult,
    )
    timeout = m.probe_timeout or cfg.intervals.health_timeout
    return Settings(params, min(timeout, max(0.05, m.probe_interval)), m.sync_interval, m.gossip_interval)


__all__ = ["Settings", "problems", "settings"]
