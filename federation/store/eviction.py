"""The store's eviction policy as pure functions: which cards may go, and which go first.

A store over its byte cap removes least-recently-used cards that came from elsewhere
(fetched or recovered) and that nobody holds: never a pinned card (the engine or the user
needs it), a published one (this node serves it) or a local one (this node made it).
"""

from __future__ import annotations

from collections.abc import Iterable


def is_evictable(*, pinned: bool, published: bool, source: str) -> bool:
    """May eviction take a card with these flags?"""
    return not pinned and not published and source != "local"


def choose_victims(total: int, cap: int, candidates: Iterable[tuple[str, int, bool, bool, str]]) -> list[str]:
    """Digests to remove, in order, to bring `total` bytes down to `cap`.

    `candidates`: (digest, size, pinned, published, source), least recently used first.
    Stops as soon as the total fits; returns every evictable one if even that is not enough.
    """
    out: list[str] = []
    for digest, size, pinned, published, source in candidates:
        if total <= cap:
            break
        if is_evictable(pinned=pinned, published=published, source=source):
            out.append(digest)
            total -= size
    return out


__all__ = ["choose_victims", "is_evictable"]
