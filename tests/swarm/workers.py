"""What the resume tests run in a spawned child process (spawn, never fork): a swarm fetch
that pauses at a pause point to be SIGKILLed there."""

from __future__ import annotations

import os

from loraflight.federation.swarm import SchedulerConfig, SwarmConfig

# one request at a time: a fetch paused after keeping its k-th piece has asked for k pieces
SERIAL = SwarmConfig(
    scheduler=SchedulerConfig(total=1, retry_after_s=0.05, referral_wait_s=0.05),
    piece_timeout_s=30.0,
    idle_timeout_s=30.0,
    progress_timeout_s=60.0,
    fetch_timeout_s=120.0,
)


def swarm_fetch_into(store_dir: str, origin: str, digest: str, phase: str, marker: str) -> None:
    """Fetch card `digest` from `origin` through the swarm into a store; pauses at `phase`."""
    from loraflight.federation.pause import ENV, MARKER_ENV

    os.environ[ENV] = phase
    os.environ[MARKER_ENV] = marker
    from loraflight.federation import Client, Store
    from loraflight.federation.server import CardServer
    from loraflight.federation.swarm import swarm_fetch

    with Store(store_dir) as store, Client(origin, timeout=30.0) as c:
        server = CardServer(store)
        try:
            entry = next(e for e in c.list() if e.digest == digest)
            swarm_fetch(server.swarm, entry, lambda uri: c, locations=[origin], config=SERIAL)
        finally:
            server.stop()


__all__ = ["SERIAL", "swarm_fetch_into"]
