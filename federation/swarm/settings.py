"""The `swarm.*` keys of a `NodeConfig` as the swarm's own settings: the upload side's
`SwarmLimits`, a fetch's `SwarmConfig`, and how many peers hear of a card published here.
(The keys are checked with the rest of the config: `config_checks.swarm_problems`.)"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loraflight.errors import ConfigError

from .fetch import SwarmConfig
from .scheduler import SchedulerConfig
from .service import SwarmLimits


@dataclass(frozen=True)
class Settings:
    limits: SwarmLimits
    fetch: SwarmConfig
    notify: int  # peers notified at once of a card published here that the swarm spreads


def settings(cfg: Any) -> Settings:
    """`Settings` from a NodeConfig; ConfigError listing every bad `swarm.*` key."""
    from ..config_checks import swarm_problems

    bad = swarm_problems(cfg)
    if bad:
        raise ConfigError("invalid swarm settings:\n  " + "\n  ".join(bad))
    sw = cfg.swarm
    limits = SwarmLimits(
        max_uploads=sw.max_uploads,
        max_uploads_per_peer=sw.max_uploads_per_peer,
        upload_wait_s=sw.upload_wait,
        origin_extra=sw.origin_extra,
    )
    sched = dataclasses.replace(
        SchedulerConfig(),
        total=sw.fetch_concurrency,
        per_peer=min(sw.fetch_per_peer, sw.fetch_concurrency),
        referral_wait_s=sw.referral_wait,
    )
    return Settings(limits, SwarmConfig(scheduler=sched), sw.notify)


__all__ = ["Settings", "settings"]
