"""A card being fetched piece by piece: each verified piece is kept as its own file in the
store's tmp/ (emptied on every open, so a kill leaves nothing partial behind), served to
other peers from there, and assembled in order into the store's normal commit when all are
in (`Store.commit_file`: admission checks, rename, index, as any received card)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from loraflight.engine.card import METADATA_KEY, LoRACard, card_schema
from loraflight.errors import CardError, StoreError

from ..protocol import CatalogEntry
from ..store import Store
from ..store.disk import disk_error


class PartialCard:
    """The verified pieces of one card so far (thread-safe); `commit` or `discard` it."""

    def __init__(self, store: Store, entry: CatalogEntry) -> None:
        if entry.header.major < 2 or not entry.header.pieces:
            raise CardError(f"{entry.ref} is a format-{entry.header.major} card: it has no pieces")
        self.store = store
        self.entry = entry
        self.count = len(entry.header.pieces)
        raw = entry.header_json or entry.header.to_json()
        self.schema = card_schema(entry.header.dtype, {METADATA_KEY: raw})
        self._paths: dict[int, Path] = {}
        self._batches: dict[int, pa.RecordBatch] = {}
        self._loose: set[Path] = set()  # written, not (yet) kept: deleted by discard too
        self._lock = threading.Lock()
        self._closed = False

    def has(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._paths)

    @property
    def complete(self) -> bool:
        with self._lock:
            return len(self._paths) == self.count

    def write(self, index: int, batch: pa.RecordBatch) -> tuple[Path, pa.RecordBatch]:
        """Write a received piece to its own file in tmp/ and map it back (aligned, zero-copy),
        not yet kept: verify the mapped batch, then `keep` or `drop` it."""
        path = self.store.temp_path()
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.entry.ref}: this partial card was already committed or discarded")
            self._loose.add(path)
        try:
            with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, self.schema) as w:
                w.write_batch(pa.record_batch(batch.columns, schema=self.schema))
            mapped = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
        except OSError as e:
            self.drop(path)
            raise disk_error(e, f"cannot keep piece {index} of {self.entry.ref}") from None
        except pa.ArrowException as e:
            self.drop(path)
            raise CardError(f"piece {index} of {self.entry.ref} is not a card batch: {e}") from None
        with self._lock:
            closed = self._closed
        if closed:  # discarded meanwhile: its file must not outlive it
            self.drop(path)
            raise StoreError(f"{self.entry.ref}: this partial card was discarded")
        return path, mapped

    def keep(self, index: int, path: Path, mapped: pa.RecordBatch) -> bool:
        """Keep a verified piece written by `write`; False (and its file deleted) when held already."""
        with self._lock:
            self._loose.discard(path)
            if not self._closed and index not in self._paths:
                self._paths[index] = path
                self._batches[index] = mapped
                return True
        self.drop(path)
        return False

    def drop(self, path: Path) -> None:
        with self._lock:
            self._loose.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)

    def add(self, index: int, batch: pa.RecordBatch) -> bool:
        """`write` then `keep` a piece verified already (tests, local copies)."""
        path, mapped = self.write(index, batch)
        return self.keep(index, path, mapped)

    def batch(self, index: int) -> pa.RecordBatch | None:
        """Verified piece `index` (mapped from its file), or None when not held."""
        with self._lock:
            return self._batches.get(index)

    def commit(self, *, source: str, locations: Iterable[str]) -> CatalogEntry:
        """Write every piece in order into one card file in tmp/, fsync it, open it (structure,
        header, piece layout) and hand it to the store's normal commit (`Store.commit_file`:
        admission, rename, index). Each piece was verified on arrival and the header's digest
        by `swarm_fetch`, so nothing is hashed twice."""
        with self._lock:
            if len(self._paths) != self.count:
                raise CardError(f"{self.entry.ref}: {len(self._paths)} of {self.count} pieces are in")
            batches = [self._batches[i] for i in range(self.count)]
        e = self.entry
        tmp = self.store.temp_path()
        try:
            try:
                with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, self.schema) as w:
                    for b in batches:
                        w.write_batch(b)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as err:
                raise disk_error(err, f"cannot store {e.ref}") from None
            card = LoRACard.open(tmp)
            rows = len(card)
            same = card.header == e.header
            del card
            if not same or rows != e.rows:
                raise CardError(f"{e.ref}: the assembled card's header or rows differ from the listing's")
            return self.store.commit_file(tmp, e.header, rows, source, False, False, locations)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # renamed away on success

    def discard(self) -> None:
        """Delete every piece file (open maps stay valid until dropped)."""
        with self._lock:
            self._closed = True
            paths, self._paths = [*self._paths.values(), *self._loose], {}
            self._loose = set()
            self._batches = {}
        for p in paths:
            with contextlib.suppress(OSError):
                os.unlink(p)


__all__ = ["PartialCard"]
