"""Applies the hot-load rules (`hotload`) to a running engine: loads, swaps, unloads, and
keeps what the engine holds pinned in the store.

Runs on the node's event thread (and once at start); one lock orders loads and unloads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from loraflight.engine.card import LoRACard
from loraflight.errors import EngineError, LoraflightError, TrustError

from ..metrics import NodeMetrics
from ..protocol import CatalogEntry
from ..store import Store
from .engine import NodeEngine
from .hotload import engine_refusal, missing_parents, newest_per_name, pin_changes, pins_needed

log = logging.getLogger("loraflight.federation.node")


class Loader:
    """The adapters one node loaded into its engine, by name."""

    def __init__(
        self,
        engine: NodeEngine,
        store: Store,
        *,
        base_model: str | None,
        trust_engine: str,
        engine_keys: Collection[str],
        metrics: NodeMetrics,
        on_loaded: Callable[[CatalogEntry], None],
    ) -> None:
        self.engine = engine
        self.store = store
        self.base_model = base_model
        self.trust_engine = trust_engine
        self.engine_keys = engine_keys
        self.metrics = metrics
        self.on_loaded = on_loaded
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[int, str]] = {}  # name -> (version, digest)
        self._loaded_at: dict[str, float] = {}  # adapter name -> wall time of its last hot-load
        self._pins: set[str] = set()  # digests pinned because the engine holds them
        # children whose lineage parents have not reached the store yet: digest -> entry
        self._awaiting: dict[str, CatalogEntry] = {}

    def loaded(self) -> dict[str, dict[str, Any]]:
        """name -> version, digest."""
        with self._lock:
            return {n: {"version": v, "digest": d} for n, (v, d) in sorted(self._loaded.items())}

    def loaded_at(self, name: str) -> float | None:
        return self._loaded_at.get(name)

    def __len__(self) -> int:
        return len(self._loaded)

    def load_existing(self) -> None:
        """Load the newest admitted version of every name in the store (a starting node): a
        newer version the rules refuse (unsigned, a stranger's key, another base model) must
        not stop an older admitted one from loading."""
        by_name: dict[str, list[CatalogEntry]] = {}
        for e in self.store.list():
            by_name.setdefault(e.name, []).append(e)
        for name, entries in sorted(by_name.items()):
            newest = newest_per_name(entries)[0]
            self.load(newest)
            for e in sorted(entries, key=lambda x: -x.version):
                if name in self._loaded:
                    break
                if e.digest != newest.digest:
                    self.load(e)

    def load(self, entry: CatalogEntry, *, rollback: bool = False) -> None:
        """Load `entry` if the rules allow it (or park it until its lineage parents arrive).

        `rollback`: an older version may replace the loaded one of its name (in place).
        """
        store = self.store
        with self._lock:
            loaded = {n: v for n, v in self._loaded.items() if n != entry.name} if rollback else self._loaded
            why = engine_refusal(
                entry,
                base_model=self.base_model,
                loaded=loaded,
                trust_engine=self.trust_engine,
                engine_keys=self.engine_keys,
            )
            if why:
                log.info("not loading %s: %s", entry.ref, why)
                return
            missing = missing_parents(entry, store.entry_exists)
            if missing:
                # The sync planner fetches parents with their child, but they may commit after
                # it: load the child once every parent is in the store.
                log.info("%s waits for lineage parent(s) %s", entry.ref, ", ".join(d[:12] for d in missing))
                self._awaiting[entry.digest] = entry
                return
            self._awaiting.pop(entry.digest, None)
            t0 = time.perf_counter()
            try:
                card = LoRACard.open(store.path_of(entry.digest))
                trust = list(self.engine_keys) if self.trust_engine == "signed" else None
                self.engine.load(
                    card,
                    trust=trust,
                    resolver=lambda d: store.path_of(d) if store.entry_exists(d) else None,
                )
                self._loaded[entry.name] = (entry.version, entry.digest)
                self._loaded_at[entry.name] = time.time()
                self._repin()
            except (EngineError, TrustError) as e:
                log.warning("not loading %s: %s", entry.ref, e)
                self.metrics.failures.labels("load").inc()
                return
            except LoraflightError as e:
                log.error("loading %s failed: %s", entry.ref, e)
                self.metrics.failures.labels("load").inc()
                return
            dt = time.perf_counter() - t0
        self.metrics.load_seconds.observe(dt)
        log.info("hot-loaded %s in %.1f ms", entry.ref, dt * 1000)
        self.on_loaded(entry)

    def retry_awaiting(self) -> None:
        """Load children that were waiting for a lineage parent now in the store."""
        for entry in list(self._awaiting.values()):
            if not missing_parents(entry, self.store.entry_exists):
                self.load(entry)

    def forget(self, entry: CatalogEntry) -> None:
        """A card left the store: stop waiting for it; unload it if it is the loaded version."""
        self._awaiting.pop(entry.digest, None)
        with self._lock:
            cur = self._loaded.get(entry.name)
            if cur is None or cur[1] != entry.digest:
                return
            try:
                self.engine.unload(entry.name)
            except LoraflightError as e:
                log.warning("unloading %s: %s", entry.ref, e)
            del self._loaded[entry.name]
            self._repin()

    def withdrawn(self, entry: CatalogEntry) -> list[str]:
        """`entry` was withdrawn and left the store: unload loaded children whose lineage names
        it (logged), then put the newest remaining admitted version of each affected name in
        its place (rollback), or unload the name when none is left. Returns the names touched.

        The engine swaps adapters by snapshot, so requests already running on the withdrawn
        adapter finish on it.
        """
        self._awaiting.pop(entry.digest, None)
        children = [n for n in self._children_of(entry.digest) if n != entry.name]
        for name in children:
            self._unload(name, f"its lineage parent {entry.ref} ({entry.digest[:12]}…) was withdrawn")
        touched = list(children)
        cur = self._loaded.get(entry.name)
        if cur is not None and cur[1] == entry.digest:
            touched.insert(0, entry.name)
        for name in touched:
            if not self._rollback(name, exclude=entry.digest) and name == entry.name:
                self._unload(name, f"{entry.ref} was withdrawn and no other admitted version is held")
        return touched

    def _children_of(self, digest: str) -> list[str]:
        """Loaded names whose lineage (transitively, through held cards) includes `digest`."""
        store = self.store

        def lineage_of(d: str) -> tuple[str, ...] | None:
            e = store.entry(d)
            return None if e is None else tuple(e.header.lineage)

        with self._lock:
            loaded = dict(self._loaded)
        out = []
        for name, (_v, d) in sorted(loaded.items()):
            if d != digest and digest in pins_needed({name: (0, d)}, lineage_of):
                out.append(name)
        return out

    def _unload(self, name: str, why: str) -> None:
        with self._lock:
            if name not in self._loaded:
                return
            try:
                self.engine.unload(name)
            except LoraflightError as e:
                log.warning("unloading %s: %s", name, e)
            del self._loaded[name]
            self._repin()
        log.warning("unloaded %s: %s", name, why)

    def _rollback(self, name: str, exclude: str) -> bool:
        """Load the newest held version of `name` the rules admit (not `exclude`); True if one is."""
        candidates = sorted(
            (e for e in self.store.list(name=name) if e.name == name and e.digest != exclude),
            key=lambda e: -e.version,
        )
        for e in candidates:
            self.load(e, rollback=True)
            cur = self._loaded.get(name)
            if cur is not None and cur[1] == e.digest:
                log.warning("rolled %s back to %s (%s…)", name, e.ref, e.digest[:12])
                return True
        return False

    def _repin(self) -> None:
        """Pin what the engine holds (see `hotload.pins_needed`); unpin what it no longer needs
        (a swapped-out version). Caller holds the lock."""
        store = self.store

        def lineage_of(d: str) -> tuple[str, ...] | None:
            e = store.entry(d)
            return None if e is None else tuple(e.header.lineage)

        need = pins_needed(self._loaded, lineage_of)
        pin, unpin = pin_changes(need, self._pins)
        for d in pin:
            with contextlib.suppress(LoraflightError):
                store.pin(d)
        for d in unpin:
            with contextlib.suppress(LoraflightError):
                store.unpin(d)
        self._pins = need


__all__ = ["Loader"]
