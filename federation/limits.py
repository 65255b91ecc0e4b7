"""Stream slots: how many transfers a node serves at once, in all and per client, and the
watchdog that frees the slot of a stream that stopped making progress (docs/protocol.md,
"Limits"). The counting rules are plain code; one daemon thread per pool applies the
deadline.

A client is its bearer token when it sends one (so two users behind one NAT address are two
clients) and otherwise its address without the port (so one host opening many connections
is one client). A stream that makes no progress for `idle_s` is *stalled*: it gives its
slot in the pool and its client's count back at once (a real transfer waiting for one gets
it) and is refused the next time it asks to go on. Stalled streams still count against
`max_open` (refused at once beyond it) until their handlers end, so they cannot pile up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from loraflight.errors import BusyError, LoraflightError, PeerError

from .protocol import to_flight_error

log = logging.getLogger(__name__)

CLIENT_MIDDLEWARE = "lf-client"  # the key of ClientKeyFactory in a server's middleware dict


def client_key(peer: str | None, authorization: str | None) -> str:
    """The identity limits are counted by: a digest of the bearer token when one is sent,
    else the caller's address without its port (gRPC's `ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`)."""
    if authorization:
        value = authorization.partition(" ")[2].strip() or authorization
        return "token:" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16]
    text = peer or ""
    kind, _, rest = text.partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        host = rest.rsplit(":", 1)[0] if rest.count(":") >= 1 else rest
        return "addr:" + host.strip("[]")
    return "addr:" + (text or "unknown")


class ClientKeyMiddleware(flight.ServerMiddleware):
    """Per call: the authorization header, kept so a handler can name its client."""

    def __init__(self, authorization: str | None) -> None:
        self.authorization = authorization


class ClientKeyFactory(flight.ServerMiddlewareFactory):
    """Records each call's authorization header for `call_client_key`."""

    def start_call(self, info: Any, headers: Mapping[str, Any]) -> ClientKeyMiddleware:
        v = headers.get("authorization")
        first = v[0] if isinstance(v, list | tuple) and v else v
        if isinstance(first, bytes):
            first = first.decode("utf-8", "replace")
        return ClientKeyMiddleware(first if isinstance(first, str) else None)


def call_client_key(context: Any) -> str:
    """The client key of a server call (see `client_key`)."""
    if context is None:
        return "addr:local"
    mw = context.get_middleware(CLIENT_MIDDLEWARE)
    try:
        peer = context.peer()
    except Exception:
        peer = None
    if isinstance(peer, bytes):
        peer = peer.decode("utf-8", "replace")
    return client_key(peer, mw.authorization if mw is not None else None)


@dataclasses.dataclass
class Slot:
    """One admitted stream: call `progress()` as it moves, `check()` before going on,
    `release()` when it ends (idempotent)."""

    pool: StreamSlots
    client: str
    last: float
    stalled: bool = False
    released: bool = False

    def progress(self) -> None:
        self.last = time.monotonic()

    def check(self) -> None:
        if self.stalled:
            raise PeerError(
                f"this {self.pool.what} stream made no progress for {self.pool.idle_s:.0f} s; it was "
                "cancelled and its slot given to another transfer"
            )

    def release(self) -> None:
        self.pool.release(self)


class StreamSlots:
    """A pool of `total` slots, at most `per_client` per client (see the module doc)."""

    def __init__(
        self,
        what: str,
        *,
        total: int,
        per_client: int,
        idle_s: float,
        wait_s: float = 0.0,
        max_open: int | None = None,
    ) -> None:
        if total < 1 or per_client < 1 or idle_s <= 0:
            raise ValueError("stream slots need total >= 1, per_client >= 1 and idle_s > 0")
        self.max_open = max(total, max_open if max_open is not None else 4 * total)
        self.what = what
        self.total = total
        self.per_client = per_client
        self.idle_s = idle_s
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._active: set[int] = set()  # ids of slots holding a pool slot
        self._slots: dict[int, Slot] = {}
        self._per_client: dict[str, int] = {}
        self._closed = False
        self._watchdog: threading.Thread | None = None
        self.stalled_total = 0

    # -- counting
    def acquire(self, client: str) -> Slot:
        """A slot for `client`, waiting up to `wait_s` while the pool is full or the client holds
        `per_client` active streams; BusyError when none frees in time, or at once when the
        streams open here (stalled ones included) reach `max_open`."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            if len(self._slots) >= self.max_open:
                raise BusyError(
                    f"this node has {len(self._slots)} {self.what} streams open, stalled ones included "
                    "(its limit); retry later or use another location"
                )
            while len(self._active) >= self.total or self._per_client.get(client, 0) >= self.per_client:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    if self._per_client.get(client, 0) >= self.per_client:
                        raise BusyError(
                            f"this client has {self.per_client} {self.what} streams running on this node "
                            "already (the per-client limit); finish one first"
                        )
                    raise BusyError(
                        f"this node is serving {self.total} {self.what} streams already; retry or use "
                        "another location"
                    )
                self._cond.wait(min(left, 1.0))
            slot = Slot(self, client, time.monotonic())
            self._slots[id(slot)] = slot
            self._active.add(id(slot))
            self._per_client[client] = self._per_client.get(client, 0) + 1
            self._start_watchdog()
            return slot

    def _uncount(self, slot: Slot) -> None:
        """Take `slot` off its client's active count (caller holds the lock)."""
        n = self._per_client.get(slot.client, 0) - 1
        if n > 0:
            self._per_client[slot.client] = n
        else:
            self._per_client.pop(slot.client, None)

    def release(self, slot: Slot) -> None:
        with self._cond:
            if slot.released:
                return
            slot.released = True
            self._slots.pop(id(slot), None)
            if id(slot) in self._active:
                self._active.discard(id(slot))
                self._uncount(slot)
            self._cond.notify_all()

    def expire(self, now: float) -> int:
        """Mark streams idle for `idle_s` stalled and give their pool slots back; how many."""
        n = 0
        with self._cond:
            for sid in list(self._active):
                slot = self._slots[sid]
                if now - slot.last >= self.idle_s:
                    slot.stalled = True
                    self._active.discard(sid)
                    self._uncount(slot)
                    n += 1
            if n:
                self.stalled_total += n
                self._cond.notify_all()
        return n

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active), "open": len(self._slots), "stalled": self.stalled_total}

    # -- the watchdog
    def _start_watchdog(self) -> None:
        if self._watchdog is None and not self._closed:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"loraflight-{self.what}-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch(self) -> None:
        step = min(1.0, max(0.05, self.idle_s / 4))
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(step)
                if self._closed:
                    return
            n = self.expire(time.monotonic())
            if n:
                log.warning(
                    "%d %s stream(s) made no progress for %.0f s: slots freed", n, self.what, self.idle_s
                )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def watched(batches: Iterator[pa.RecordBatch], slot: Slot) -> Iterator[pa.RecordBatch]:
    """`batches` holding a transfer slot: progress at each pull (the previous batch went out),
    refused once the watchdog found the stream stalled; the slot is released when it ends."""
    try:
        for b in batches:
            slot.check()
            yield b
            slot.progress()
        slot.check()
    except LoraflightError as e:
        raise to_flight_error(e, flight) from None
    finally:
        slot.release()


class TickingReader:
    """A do_exchange reader that tells its slot about every message read."""

    def __init__(self, reader: Any, slot: Slot) -> None:
        self._reader = reader
        self._slot = slot

    def read_chunk(self) -> Any:
        chunk = self._reader.read_chunk()
        self._slot.check()
        self._slot.progress()
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


__all__ = [
    "CLIENT_MIDDLEWARE",
    "ClientKeyFactory",
    "ClientKeyMiddleware",
    "Slot",
    "StreamSlots",
    "TickingReader",
    "call_client_key",
    "client_key",
    "watched",
]
