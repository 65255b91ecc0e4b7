"""Connections a node keeps to its peers: one gRPC channel per peer and kind, reused by every call.

A node talks to the same few peers all the time: SWIM pings, `have`s while a card spreads,
piece fetches, health probes, syncs. Dialling a fresh Flight connection for each of them
costs a TCP and HTTP/2 handshake on both ends and, for a new `Client`, a `health` call
before the first real one: about 2.4 ms of CPU per call against 0.8 ms on a kept
connection, measured on 127.0.0.1 (docs/decisions.md, "Kept connections to peers").

`ConnectionPool` keeps each (address, TLS settings, message cap) connection for reuse and
the peer's last `health` answer for `HEALTH_TTL_S`, so a `Client` made for one call skips
the compatibility round trip when the peer answered one a moment ago. A `Client` asks the
pool for the connection at every call, so a connection the pool dropped is never used
again: it is dropped (and the next call dials afresh) when a call to that peer fails as
unreachable or timed out, when it was not asked for in `IDLE_S` (longer than any call
lasts), and when the pool is closed. Bounded (`MAX_CONNECTIONS`, least recently used out
first). Thread-safe: gRPC channels are.

The pool never closes a connection itself: it lets go of it, and the connection closes when
nothing holds it any more (`FlightClient.__del__` closes it). A call in progress holds its
connection, and so does the `Client` that made the call until it is closed (a stream it
returned reads from that connection). Closing one under a call in another thread crashed the
process (a segfault in `do_action`: a node stopping while its probe of a peer was in flight,
or one call's failure dropping the connection another call was using).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pyarrow.flight as flight

from loraflight.errors import PeerError

from .security import ClientTLS

IDLE_S = 900.0  # a connection unused this long is closed (longer than any call: a fetch's deadline is 600 s)
HEALTH_TTL_S = 10.0  # a peer's `health` answer stands in for the next compatibility check this long
MAX_CONNECTIONS = 4096
# Reconnect quickly after a peer comes back (gRPC's default backoff grows to two minutes;
# a kept channel must not sit in it while the peer is up again).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]

Key = tuple[str, Any, int]


def tls_key(tls: ClientTLS | None) -> Any:
    """What identifies a client's TLS settings in a pool key (its contents, not its object)."""
    if tls is None:
        return None
    return (tls.ca, tls.cert, tls.key, tls.override_hostname)


class ConnectionPool:
    """Kept Flight connections per (uri, TLS, message cap) and recent `health` answers per uri."""

    def __init__(
        self,
        dial: Callable[[str, ClientTLS | None, int], flight.FlightClient],
        *,
        idle_s: float = IDLE_S,
        health_ttl_s: float = HEALTH_TTL_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._dial = dial
        self.idle_s = idle_s
        self.health_ttl_s = health_ttl_s
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._conns: OrderedDict[Key, tuple[flight.FlightClient, float]] = OrderedDict()
        self._health: dict[str, tuple[dict[str, Any], float]] = {}
        self._closed = False
        self.dialled = 0  # connections made (tests read it)

    def get(self, uri: str, tls: ClientTLS | None, max_message: int) -> flight.FlightClient:
        """The kept connection for this key, or a new one (kept from now on)."""
        key = (uri, tls_key(tls), max_message)
        now = time.monotonic()
        stale: list[flight.FlightClient] = []
        with self._lock:
            if self._closed:
                raise PeerError(f"{uri}: this node is stopping; its connections are closed")
            got = self._conns.pop(key, None)
            if got is not None and now - got[1] > self.idle_s:
                stale.append(got[0])
                got = None
            # idle ones at the old end go too (lazily, no thread)
            while self._conns:
                k, (c, used) = next(iter(self._conns.items()))
                if now - used <= self.idle_s and len(self._conns) < self.max_connections:
                    break
                del self._conns[k]
                stale.append(c)
        del stale  # let go outside the lock: a connection nobody holds closes now
        conn = got[0] if got is not None else self._dial(uri, tls, max_message)
        with self._lock:
            if got is None:
                self.dialled += 1
            if self._closed:
                stale = [conn]
            else:
                old = self._conns.pop(key, None)  # another thread dialled the same key meanwhile
                self._conns[key] = (conn, now)
                stale = [old[0]] if old is not None and old[0] is not conn else []
        del stale
        return conn

    def drop(self, uri: str) -> None:
        """Forget the connections to `uri` (a call failed as unreachable or timed out) and its
        `health`: the next call dials afresh and checks again. Calls still using them finish."""
        with self._lock:
            gone = [k for k in self._conns if k[0] == uri]
            conns = [self._conns.pop(k)[0] for k in gone]
            self._health.pop(uri, None)
        del conns  # closed as soon as no call or client holds them

    def remember_health(self, uri: str, answer: dict[str, Any]) -> None:
        with self._lock:
            self._health[uri] = (answer, time.monotonic())
            if len(self._health) > self.max_connections:
                oldest = min(self._health, key=lambda u: self._health[u][1])
                del self._health[oldest]

    def recent_health(self, uri: str) -> dict[str, Any] | None:
        """The peer's `health` answer when it came within `health_ttl_s`, else None."""
        with self._lock:
            got = self._health.get(uri)
        if got is None or time.monotonic() - got[1] > self.health_ttl_s:
            return None
        return got[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        """Refuse calls from now on and let go of every connection (calls in progress finish)."""
        with self._lock:
            self._closed = True
            conns = [c for c, _ in self._conns.values()]
            self._conns.clear()
            self._health.clear()
        del conns  # closed as soon as no call or client holds them


__all__ = ["HEALTH_TTL_S", "IDLE_S", "MAX_CONNECTIONS", "RECONNECT_OPTIONS", "ConnectionPool", "tls_key"]
