"""Pure rate limits: token buckets per source, and log lines summed up per interval.

`RateLimiter` keeps one `TokenBucket` per source key (a token's id, or a caller's address)
and at most `max_keys` of them (the least recently used one goes first), so a flood of
sources costs bounded memory. `SummaryLog` turns a burst of the same warning into one line
per interval that says how many were suppressed. Both take a `clock`, so they are tested
without sleeping; the server threads apply them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """`rate` tokens a second, up to `burst`; `take()` spends one when there is one."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """Per-key token buckets, bounded in number (thread-safe)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a rate limit needs rate > 0, burst >= 1 and max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def allow(self, key: str) -> bool:
        """Whether one more call from `key` is within its limit (and count it)."""
        now = self._clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
                while len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            return b.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


class SummaryLog:
    """At most one line per `interval` seconds per message kind; the rest are counted and the
    next line says how many were suppressed."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `kind` was logged less than `interval` ago; True if logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._suppressed[kind] += 1
                return False
            self._last[kind] = now
            n = self._suppressed.pop(kind, 0)
        if n:
            self.logger.log(level, msg + " (%d more like it in the last %.0f s)", *args, n, self.interval)
        else:
            self.logger.log(level, msg, *args)
        return True

    def suppressed(self, kind: str) -> int:
        """How many lines of `kind` wait to be summed up in its next line."""
        with self._lock:
            return self._suppressed.get(kind, 0)


__all__ = ["RateLimiter", "SummaryLog", "TokenBucket"]
