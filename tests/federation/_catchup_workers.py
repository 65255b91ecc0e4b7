"""Run in spawned child processes by the catch-up kill tests (spawn, never fork)."""

from __future__ import annotations

import os


def catch_up(store_dir: str, uri: str, phase: str | None, marker: str | None, bundle_cards: int) -> None:
    """Sync everything from `uri`, one bundle at a time; pauses (to be SIGKILLed) at `phase`."""
    if phase:
        from loraflight.federation.pause import ENV, MARKER_ENV

        os.environ[ENV] = phase
        os.environ[MARKER_ENV] = marker or ""
    from loraflight.federation import Store, SyncPolicy, sync

    with Store(store_dir) as s:
        sync([uri], SyncPolicy(), s, concurrency=1, bundle_cards=bundle_cards)


__all__ = ["catch_up"]
