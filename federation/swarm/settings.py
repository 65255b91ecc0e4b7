"""The `swarm.*` keys of a `NodeConfig` as the swarm's own settings: the upload side's
`SwarmLimits`, a fetch's `SwarmConfig`, and how many peers hear of a card published here.
(The keys are checked with the rest of the config: `config_checks.swarm_problems`.)

Also the one kernel setting the swarm's speed depends on: how much unsent data a socket may
queue (`net.ipv4.tcp_notsent_lowat`, docs/operations.md, "A kernel setting for fast spreads").
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflight.errors import ConfigError

from .fetch import SwarmConfig
from .scheduler import SchedulerConfig
from .service import SwarmLimits

log = logging.getLogger("loraflight.swarm")

# What deploy/ sets net.ipv4.tcp_notsent_lowat to (bytes), and the most a node does not remark on.
SEND_QUEUE_BYTES = 16384
SEND_QUEUE_NOTE_ABOVE = 128 << 10
SYSCTL_PATH = Path("/proc/sys/net/ipv4/tcp_notsent_lowat")
_noted = False


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
    _note_send_queue()
    return Settings(limits, SwarmConfig(scheduler=sched), sw.notify)


def send_queue_note(lowat: int | None) -> str | None:
    """What to tell an operator about `net.ipv4.tcp_notsent_lowat` (None: nothing to say).

    With the kernel's default (no limit) a socket takes a whole 4 MiB piece at once, so a
    holder's upload slot frees long before the piece is through the link, the next piece shares
    the link with it and both land late; every hop of a spreading card pays for it."""
    if lowat is None or lowat <= SEND_QUEUE_NOTE_ABOVE:
        return None
    now = "unset (the kernel default)" if lowat >= 1 << 31 else f"{lowat} bytes"
    return (
        f"net.ipv4.tcp_notsent_lowat is {now}: cards spread peer to peer more slowly than with "
        f"{SEND_QUEUE_BYTES} (deploy/sysctl.d/60-loraflight.conf; docs/operations.md, "
        '"A kernel setting for fast spreads")'
    )


def read_send_queue_limit(path: Path = SYSCTL_PATH) -> int | None:
    """The running kernel's `tcp_notsent_lowat` for this network namespace; None off Linux."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def log_send_queue_note(path: Path = SYSCTL_PATH) -> str | None:
    """Log `send_queue_note` for the setting at `path` (at INFO) and return it."""
    note = send_queue_note(read_send_queue_limit(path))
    if note is not None:
        log.info("%s", note)
    return note


def _note_send_queue() -> None:
    """`log_send_queue_note` once per process (the first node config read)."""
    global _noted
    if not _noted:
        _noted = True
        log_send_queue_note()


__all__ = [
    "SEND_QUEUE_BYTES",
    "SEND_QUEUE_NOTE_ABOVE",
    "SYSCTL_PATH",
    "Settings",
    "log_send_queue_note",
    "read_send_queue_limit",
    "send_queue_note",
    "settings",
]
