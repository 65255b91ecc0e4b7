"""A card being fetched piece by piece: each received piece is written to its own file in the
store's tmp/, mapped back and verified there (`check_piece`), then renamed into the store's
kept pieces (`<store>/pieces/<digest>/<i>.piece`, `store.pieces`), served to other peers from
there, and assembled in order into the store's normal commit when all are in
(`Store.commit_file`: admission checks, rename, index, as any received card; the commit
deletes the kept pieces).

A kill leaves whole verified piece files in pieces/ and garbage in tmp/ (which every open
empties). The next fetch of that digest picks the kept pieces up (`resume`): each is mapped
and verified again against the header before it counts; one that fails is deleted and
fetched again. `close` keeps the verified pieces for a later fetch (a stop, a fetch that
failed and will be retried); `discard` deletes them (the card is refused for good)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from loraflight.engine.card import METADATA_KEY, CardHeader, LoRACard, card_schema, verify_piece
from loraflight.errors import CardError, StoreError

from ..pause import pause_point
from ..protocol import CatalogEntry
from ..store import Store
from ..store.disk import disk_error
from ..store.values import check_batch_finite, plain_schema

log = logging.getLogger(__name__)


def schema_problem(header: CardHeader, index: int, batch: pa.RecordBatch) -> str | None:
    """Why `batch` cannot be piece `index` of a card of `header`'s dtype by its schema, or None."""
    if batch.schema.equals(plain_schema(header.dtype), check_metadata=False):
        return None
    return f"piece {index} is not a {header.dtype} card's batch"


def check_piece(header: CardHeader, index: int, batch: pa.RecordBatch) -> None:
    """What makes a batch verified piece `index` of the card `header` describes: the card
    schema, `verify_piece` (structure, BLAKE3 against the header) and finite values. CardError."""
    why = schema_problem(header, index, batch)
    if why is not None:
        raise CardError(why)
    verify_piece(header, index, batch)
    check_batch_finite(batch, header.dtype)


def open_piece(path: Path) -> pa.RecordBatch:
    """The one record batch of a piece file, mapped (zero-copy); CardError when it is not one."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches != 1:
            raise CardError(f"{path.name} holds {reader.num_record_batches} record batches, not 1")
        return reader.get_batch(0)
    except (pa.ArrowException, ValueError) as e:
        raise CardError(f"{path.name} is not an Arrow IPC file of one batch: {e}") from None


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
        self._loose: set[Path] = set()  # written, not (yet) kept: deleted by close too
        self._lock = threading.Lock()
        self._closed = False
        self._header_json = b""  # what pieces/<digest>/header.json holds (canonical)
        self.resumed = 0  # pieces picked up from an earlier fetch's kept files
        self.dropped = 0  # kept files that did not verify (deleted)

    def resume(self) -> int:
        """Pick up the pieces an earlier fetch of this digest kept in the store (after a kill,
        a stop or a failed fetch): each file is mapped and checked again (`check_piece`) before
        it counts; one that fails is deleted (and logged). Returns how many were picked up."""
        e = self.entry
        for i, path in self.store.pieces.found(e.digest, self.count).items():
            try:
                mapped = open_piece(path)
                check_piece(e.header, i, mapped)
            except (CardError, OSError) as err:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                self.dropped += 1
                log.warning("swarm %s: kept piece %d deleted, it is fetched again: %s", e.ref, i, err)
                continue
            with self._lock:
                if self._closed or i in self._paths:
                    continue
                self._paths[i], self._batches[i] = path, mapped
                self.resumed += 1
        if self.resumed or self.dropped:
            log.info(
                "swarm %s: resumed %d of %d pieces kept in this store (%d deleted, not verifying)",
                e.ref, self.resumed, self.count, self.dropped,
            )  # fmt: skip
        return self.resumed

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
        """Keep a verified piece written by `write`: renamed into the store's kept pieces (its
        map stays valid); False (and its file deleted) when held already."""
        e = self.entry
        with self._lock:
            self._loose.discard(path)
            new = not self._closed and index not in self._paths
            if new:
                try:
                    if not self._header_json:
                        self._header_json = e.header.to_json()
                    path = self.store.pieces.put(e.digest, self._header_json, index, path)
                except OSError as err:  # served and committed from tmp/ still; not resumable
                    log.warning("swarm %s: cannot keep piece %d for a restart: %s", e.ref, index, err)
                self._paths[index] = path
                self._batches[index] = mapped
                held = len(self._paths)
        if not new:
            self.drop(path)
            return False
        pause_point("swarm_piece_kept", held)
        return True

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

    def close(self) -> None:
        """Stop taking pieces; the kept pieces stay in the store for a later fetch of this card
        (`resume`), files in tmp/ are deleted (open maps stay valid until dropped)."""
        with self._lock:
            self._closed = True
            tmp = self.store.tmp_dir
            paths = [p for p in self._paths.values() if p.parent == tmp] + [*self._loose]
            self._paths, self._loose, self._batches = {}, set(), {}
        for p in paths:
            with contextlib.suppress(OSError):
                os.unlink(p)

    def discard(self) -> None:
        """`close`, and delete the kept pieces too (the card is refused here for good)."""
        self.close()
        self.store.pieces.drop(self.entry.digest)


__all__ = ["PartialCard"]
