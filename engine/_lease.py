"""Leases: adapters (by digest) an engine keeps resident while requests use them.

A serving request resolves its adapter to a digest when it is admitted and must run on
exactly those weights to the end, even if a newer version of the name swaps in or the card
is unloaded meanwhile. `Engine.lease(digests)` counts a hold on each digest; while one is
held, every snapshot the engine publishes keeps that digest's deltas (lineage chain
included) addressable under a row key of its own, ``lease_key(digest)``: under the name it
was loaded as, or, after a swap or an unload took the name away, *retained* under the key
alone (not listed in ``Engine.adapters``). `AdapterLease.row(digest)` is the name to pass
to ``Engine.forward_mixed`` for a row; the last release of a retained digest drops it.
A swap stays immediate for everything that resolves a name after it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from loraflight.errors import EngineError

LEASE_PREFIX = "\x00digest:"


def lease_key(digest: str) -> str:
    """The row name under which a leased digest's adapter is addressed in mixed batches."""
    return LEASE_PREFIX + digest


def is_lease_key(name: str) -> bool:
    return name.startswith(LEASE_PREFIX)


def digest_of_key(name: str) -> str:
    return name[len(LEASE_PREFIX) :]


class AdapterLease:
    """A hold on some adapter digests of one engine, until `release()` (or the `with` block ends)."""

    def __init__(self, digests: Sequence[str], release: Callable[[tuple[str, ...]], None]) -> None:
        self.digests = tuple(digests)
        self._release = release
        self._lock = threading.Lock()
        self._released = False

    def row(self, digest: str | None) -> str | None:
        """The adapter name for a mixed-batch row on `digest` (None: the base model)."""
        if digest is None:
            return None
        if digest not in self.digests:
            raise EngineError(f"digest {digest[:16]}… is not held by this lease; lease it first")
        if self._released:
            raise EngineError("this lease was released; take a new one")
        return lease_key(digest)

    def rows(self, digests: Iterable[str | None]) -> list[str | None]:
        return [self.row(d) for d in digests]

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """End the hold (idempotent): a retained adapter no other lease holds is dropped."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._release(self.digests)

    def __enter__(self) -> AdapterLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"AdapterLease({[d[:12] for d in self.digests]}, {state})"


__all__ = ["LEASE_PREFIX", "AdapterLease", "digest_of_key", "is_lease_key", "lease_key"]
