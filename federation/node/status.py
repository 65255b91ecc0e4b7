"""What a node reports: the status dict (`loraflight status`, the status file), how often the
status file is rewritten (`StatusWriter`), and the Prometheus gauges."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loraflight.errors import ConfigError, LoraflightError
from loraflight.files import atomic_write

from ..metrics import NodeMetrics
from ..peers import PeerTable
from ..protocol import PROTOCOL_VERSION
from ..store import Store

log = logging.getLogger("loraflight.federation.node")

STATUS_DELAY = 0.5  # seconds: the most a change waits before the status file shows it
_IDLE_WAIT = 60.0  # the writer's thread re-checks this often while nothing changes
_JOIN_TIMEOUT = 10.0


def build_status(
    *,
    node_id: str,
    fleet: str,
    uris: Sequence[str],
    store: Store | None,
    mdns: bool,
    arrived: Mapping[str, float],
    loaded: Mapping[str, Mapping[str, Any]],
    loaded_at: Mapping[str, float | None],
    base_model: str | None,
    peers: PeerTable | None,
    sync_rounds: int,
    refused: Mapping[str, str] | None = None,
    engine: object = None,
    loading: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """What `loraflight status` shows and the status file holds.

    `engine`: when it reports its adapters (`engine.Engine.adapters`), `engine_digests` is
    what the engine itself holds (name -> digest), beside what the node loaded into it.
    `refused` maps a card digest to why the engine does not hold it (other base model, unsigned,
    a newer version loaded). `loading` is (base model, `time.monotonic()` when it began) while
    the node still builds its model: `state` is then "loading" and `loading` says what and for how
    long; else `state` is "running" and `loading` is None.
    """
    st = store.stats() if store is not None else {}
    refused = refused or {}
    adapters = getattr(engine, "adapters", None)
    digests = {}
    if isinstance(adapters, Mapping):
        digests = {n: a.get("digest") for n, a in adapters.items() if isinstance(a, Mapping)}
    doing = None
    if loading is not None:
        doing = {
            "doing": f"loading the base model {loading[0]}",
            "base_model": loading[0],
            "elapsed": round(time.monotonic() - loading[1], 1),
        }
    return {
        "state": "loading" if doing else "running",
        "loading": doing,
        "node_id": node_id,
        "fleet_id": fleet,
        "protocol": PROTOCOL_VERSION,
        "uris": list(uris),
        "epoch": store.epoch if store is not None else 0,
        "mdns": mdns,
        "cards": [
            {
                "ref": e.ref,
                "digest": e.digest,
                "size": e.size,
                "source": e.source,
                "at": arrived.get(e.digest),
                **({"refused": refused[e.digest]} if e.digest in refused else {}),
            }
            for e in (store.list() if store is not None else [])
        ],
        "stats": st,
        "loaded": {n: {**v, "at": loaded_at.get(n)} for n, v in loaded.items()},
        "base_model": base_model,
        "engine": engine is not None,
        "peers": peers.snapshot() if peers is not None else [],
        "sync_rounds": sync_rounds,
        "withdrawals": [w.to_dict() for w in store.withdrawals()] if store is not None else [],
        "engine_digests": digests,
        "time": time.time(),
    }


def write_status_file(path: str | os.PathLike[str], status: Mapping[str, Any]) -> Path:
    """Atomically rewrite the status file with `status` as JSON (readers never see half of it)."""
    data = json.dumps(status, indent=1, sort_keys=True).encode()
    return atomic_write(Path(os.path.expanduser(path)), data, durable=False)


def write_due(changed: float | None, written: float | None, delay: float) -> float | None:
    """When the next coalesced write is due (pure; monotonic seconds): never while nothing
    changed since the last write began (`changed` None); at once when no write began in the last
    `delay` s; else `delay` s after the last one. A burst of changes is thus one write at its
    start and one trailing write with the state at its end."""
    if changed is None:
        return None
    return changed if written is None else max(changed, written + delay)


class StatusWriter:
    """Coalesces rewrites of the status file: `poke()` after every change (cheap, never blocks
    on I/O), and one thread calls `write()` at most once per `delay` seconds, so a burst of
    peer events costs one or two writes, and the file shows the state after the last change
    within `delay` seconds (plus the write itself). `start()` and `close()` write at once, in
    the caller's thread. Writes never overlap; a failing `write()` is logged and the next
    change writes again."""

    def __init__(
        self, write: Callable[[], None], *, delay: float = STATUS_DELAY, name: str = "lf-status"
    ) -> None:
        if not delay > 0:
            raise ConfigError(f"a StatusWriter delay is a positive number of seconds, not {delay!r}")
        self._write = write
        self.delay = delay
        self._name = name
        self._cond = threading.Condition()
        self._one_write = threading.Lock()
        self._changed: float | None = None  # when the first change not yet written came
        self._written: float | None = None  # when the last write began
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        """Write now, then rewrite after each `poke()` until `close()`."""
        with self._cond:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self.flush()
        self._thread.start()

    def poke(self) -> None:
        """Something the status shows changed: write it soon (ignored unless started)."""
        with self._cond:
            if self._thread is None or self._closing:
                return
            if self._changed is None:
                self._changed = time.monotonic()
                self._cond.notify()

    def flush(self) -> None:
        """Write now, in this thread (a pending coalesced write is then covered)."""
        with self._one_write:
            with self._cond:
                self._changed = None
                self._written = time.monotonic()
            self._call()

    def close(self, timeout: float = _JOIN_TIMEOUT) -> None:
        """Stop the thread and write the final status now (nothing if never started)."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._closing = True
            self._cond.notify()
        if thread.is_alive():
            thread.join(timeout)
        self.flush()
        with self._cond:
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    due = write_due(self._changed, self._written, self.delay)
                    now = time.monotonic()
                    if due is not None and due <= now:
                        break
                    self._cond.wait(_IDLE_WAIT if due is None else min(due - now, _IDLE_WAIT))
            with self._one_write:
                with self._cond:
                    if self._changed is None:  # a flush wrote it meanwhile
                        continue
                    self._changed = None
                    self._written = time.monotonic()
                self._call()

    def _call(self) -> None:
        try:
            self._write()
        except Exception:  # the thread must outlive a bad write; the next change retries
            log.exception("rewriting the status file failed")


def update_gauges(metrics: NodeMetrics, peers: PeerTable | None, store: Store | None, loaded: int) -> None:
    """Peers by state, cards, store bytes, epoch, adapters loaded."""
    if peers is not None:
        counts: dict[str, int] = {"live": 0, "dropped": 0, "pending": 0}
        for p in peers.all():
            counts[p.state] = counts.get(p.state, 0) + 1
        for state, n in counts.items():
            metrics.peers.labels(state).set(n)
    if store is not None:
        with contextlib.suppress(LoraflightError, Exception):
            st = store.stats()
            metrics.cards.set(st["cards"])
            metrics.store_bytes.set(st["bytes"])
            metrics.epoch.set(store.epoch)
    metrics.loaded.set(loaded)


def engine_refusals(
    store: Store | None,
    loaded: Mapping[str, Mapping[str, Any]],
    *,
    base_model: str | None,
    trust_engine: str,
    engine_keys: Sequence[str],
) -> dict[str, str]:
    """digest -> why the engine does not hold that stored card (the hot-load rules, applied now)."""
    from .hotload import engine_refusal

    if store is None:
        return {}
    held = {n: (int(v["version"]), str(v["digest"])) for n, v in loaded.items()}
    digests = {d for _, d in held.values()}
    out = {}
    for e in store.list():
        if e.digest in digests:
            continue
        why = engine_refusal(
            e, base_model=base_model, loaded=held, trust_engine=trust_engine, engine_keys=engine_keys
        )
        out[e.digest] = why or "not loaded (see the node log: the engine refused it or it waits for a parent)"
    return out


__all__ = [
    "STATUS_DELAY",
    "StatusWriter",
    "build_status",
    "engine_refusals",
    "update_gauges",
    "write_due",
    "write_status_file",
]
