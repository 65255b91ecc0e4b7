"""Receiving a bundle (several cards in one stream) and committing them as one group.

`BundleReceiver` takes the pieces of a bundle stream (`protocol.bundle_schema`): each card's
file bytes go to its own temp file; when a card's last piece arrives the file is fsynced,
opened and verified (structure, values, digest, the header the listing named). `commit`
hands every verified card to `Store.commit_group`: renamed, the directory fsynced once, one
index transaction. A card that failed is reported in place of its entry; the others commit.

Crash consistency is the single-card rule applied to a group: before the renames only temp
files exist (deleted on open); after them, orphan files the next open re-verifies and
re-indexes; so a kill leaves whole, verified cards only and an index that matches the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from loraflight.engine.card import CardHeader, LoRACard
from loraflight.errors import CardError, LoraflightError, PeerError, StoreError

from ..pause import pause_point
from ..protocol import CatalogEntry
from .disk import disk_error, start_writeback


@dataclasses.dataclass(frozen=True)
class VerifiedFile:
    """A received card file: fsynced, verified, still in tmp/."""

    tmp: Path
    header: CardHeader
    rows: int
    source: str
    locations: tuple[str, ...]


WRITEBACK_BYTES = 4 << 20  # from this size a received card's write-out is started at once


class GroupTarget(Protocol):
    """What a bundle needs from its store."""

    def temp_path(self) -> Path: ...

    def commit_group(
        self, files: Sequence[VerifiedFile], *, published: bool = False, pinned: bool = False
    ) -> list[CatalogEntry | LoraflightError]: ...


class BundleReceiver:
    """The cards of one bundle as they arrive; `commit` stores the verified ones as a group.

    `expected`: the listing entries asked for (the header each file must carry, its size and
    rows bound what is accepted). Use as a context manager: leaving without `commit` deletes
    every temp file.
    """

    def __init__(
        self,
        store: GroupTarget,
        expected: Sequence[CatalogEntry],
        *,
        source: str,
        locations: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._store = store
        self._expected = {e.digest: e for e in expected}
        self._order = [e.digest for e in expected]
        self._source = source
        self._locations = locations or {}
        self.verified: dict[str, VerifiedFile] = {}
        self.errors: dict[str, LoraflightError] = {}
        self.bytes_received = 0
        self._current: str | None = None
        self._file: Any = None
        self._tmp: Path | None = None
        self._size = 0
        self._written = 0
        self._only: pa.Buffer | None = None  # the current card's bytes when one piece held them all
        self._done = False
        self._unsynced: dict[str, Any] = {}  # verified files not fsynced yet (open)

    def __enter__(self) -> BundleReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    # -- receiving
    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Take one batch of pieces (digest, size, offset, data)."""
        if batch.num_columns != 4:
            raise PeerError("a bundle batch must have the columns digest, size, offset, data")
        digests = batch.column(0).to_pylist()
        sizes = batch.column(1).to_pylist()
        offsets = batch.column(2).to_pylist()
        data = batch.column(3)
        bufs = data.buffers()
        base = data.offset
        voffs = memoryview(bufs[1]).cast("i") if bufs[1] is not None else None
        for i, (digest, size, off) in enumerate(zip(digests, sizes, offsets, strict=True)):
            if voffs is None or digest is None or size is None or off is None:
                raise PeerError("a bundle row has a null digest, size or offset")
            start, end = voffs[base + i], voffs[base + i + 1]
            piece = bufs[2].slice(start, end - start) if end > start else None
            self._piece(digest, size, off, piece)

    def _piece(self, digest: str, size: int, off: int, piece: pa.Buffer | None) -> None:
        entry = self._expected.get(digest)
        if entry is None:
            raise PeerError(f"the bundle sent card {digest[:16]}…, which was not asked for")
        if digest in self.verified or digest in self.errors:
            raise PeerError(f"the bundle sent card {digest[:16]}… twice")
        if size < 0:  # the peer does not hold it (any more)
            self._close_current(f"{entry.ref}: the bundle moved on mid-card")
            self.errors[digest] = PeerError(f"the peer no longer holds {entry.ref}")
            return
        if size != entry.size:
            self._close_current(f"{entry.ref}: the bundle moved on mid-card")
            self.errors[digest] = CardError(
                f"{entry.ref}: the peer sends a {size}-byte file, the listing said {entry.size}; refused"
            )
            raise PeerError(f"the bundle's {entry.ref} is not the size listed")
        if self._current != digest:
            if self._current is not None:
                raise PeerError(f"the bundle started {entry.ref} before finishing the card before it")
            if off != 0:
                raise PeerError(f"the bundle's {entry.ref} does not start at offset 0")
            self._open(digest, size)
        if off != self._written:
            raise PeerError(f"the bundle's {entry.ref} pieces are not contiguous ({off} != {self._written})")
        n = piece.size if piece is not None else 0
        if self._written + n > size:
            raise PeerError(f"the bundle sent more than the {size} bytes of {entry.ref}")
        try:
            if n:
                self._file.write(piece)
        except OSError as e:
            raise disk_error(e, f"cannot write {entry.ref}") from None
        self._only = piece if n == size else None  # aligned in _finish
        self._written += n
        self.bytes_received += n
        if self._written == size:
            self._finish(entry)

    def _open(self, digest: str, size: int) -> None:
        self._tmp = self._store.temp_path()
        try:
            # unbuffered: each piece is one write(2) of an Arrow buffer, no copy into a Python buffer
            self._file = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed in _finish/_close_current
        except OSError as e:
            raise disk_error(e, f"cannot start receiving {self._expected[digest].ref}") from None
        self._current, self._size, self._written = digest, size, 0

    def _close_current(self, why: str) -> None:
        if self._current is None:
            return
        digest = self._current
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)  # type: ignore[arg-type]
        self.errors.setdefault(digest, PeerError(why))
        self._current = self._file = self._tmp = None

    def _finish(self, entry: CatalogEntry) -> None:
        """The card's last byte arrived: fsync, open, verify; keep it or record why not."""
        tmp, f, only = self._tmp, self._file, self._only
        assert tmp is not None
        self._current = self._file = self._tmp = self._only = None
        # no flush (the writes are unbuffered); the fsync comes at commit, for the whole group
        # at once. Only a big card gets the writeback hint (its write-out overlaps receiving
        # the rest); for a small one the syscall costs more than it saves.
        if self._size >= WRITEBACK_BYTES:
            try:
                start_writeback(f.fileno(), 0, self._size)
            except OSError as e:
                with contextlib.suppress(OSError):
                    f.close()
                    os.unlink(tmp)
                raise disk_error(e, f"cannot store {entry.ref}") from None
        try:
            # a card that arrived in one piece is checked in those bytes, the ones just written
            # (no re-open and re-map of the file); else the file is mapped as usual
            if only is not None:
                card = LoRACard.open_buffer(aligned(only), tmp, expect=entry.header)
            else:
                card = LoRACard.open(tmp)
            try:
                if card.header != entry.header:
                    raise CardError(f"{entry.ref}: the received file's header is not the one listed; refused")
                if len(card) != entry.rows:
                    raise CardError(f"{entry.ref}: received {len(card)} rows, {entry.rows} were listed")
                # values and digest, in this thread (a small card is not worth a hashing thread)
                card.check_values()
                digest = card.digest_job(threaded=False).result()
                if digest != entry.digest:
                    raise CardError(
                        f"{entry.ref}: digest mismatch: listed {entry.digest[:16]}…, the received content "
                        f"hashes to {digest[:16]}…; the card was tampered with or corrupted in transit; refused"
                    )
            finally:
                del card
        except LoraflightError as e:
            with contextlib.suppress(OSError):
                f.close()
                os.unlink(tmp)
            self.errors[entry.digest] = e
            return
        locs = self._locations.get(entry.digest, ())
        self.verified[entry.digest] = VerifiedFile(tmp, entry.header, entry.rows, self._source, locs)
        self._unsynced[entry.digest] = f

    def _fsync_all(self) -> None:
        """fsync every verified file at once (threads: the kernel's journal commits concurrent
        fsyncs together), then close them. A file that cannot be synced is dropped."""
        files, self._unsynced = self._unsynced, {}
        if not files:
            return

        def one(item: tuple[str, Any]) -> tuple[str, OSError | None]:
            d, f = item
            try:
                os.fsync(f.fileno())
                return d, None
            except OSError as e:
                return d, e
            finally:
                with contextlib.suppress(OSError):
                    f.close()

        for d, err in parallel_map(one, list(files.items())):
            if err is not None:
                vf = self.verified.pop(d)
                with contextlib.suppress(OSError):
                    os.unlink(vf.tmp)
                self.errors[d] = disk_error(err, f"cannot store {vf.header.ref}")
        pause_point("bundle_after_fsync", len(files))

    # -- ending
    def missing(self) -> list[str]:
        """Digests asked for that neither arrived whole nor failed (the stream ended early)."""
        return [d for d in self._order if d not in self.verified and d not in self.errors]

    def commit(self) -> dict[str, CatalogEntry | LoraflightError]:
        """Store every verified card as one group; per digest asked for, its entry or error."""
        if self._done:
            raise StoreError("this bundle was already committed or aborted")
        self._close_current("the bundle ended mid-card")
        for d in self.missing():
            self.errors[d] = PeerError(f"the bundle ended before {self._expected[d].ref}")
        out: dict[str, CatalogEntry | LoraflightError] = {}
        try:
            self._fsync_all()
            files = [self.verified[d] for d in self._order if d in self.verified]
            out.update(self.errors)
            if files:
                for f, res in zip(files, self._store.commit_group(files), strict=True):
                    out[f.header.digest] = res
        finally:
            self._done = True
            self._drop_temps()
        return {d: out[d] for d in self._order}

    def abort(self) -> None:
        self._done = True
        self._close_current("aborted")
        self._drop_temps()

    def _drop_temps(self) -> None:
        for f in self._unsynced.values():
            with contextlib.suppress(OSError):
                f.close()
        self._unsynced = {}
        for f in self.verified.values():
            with contextlib.suppress(OSError):
                os.unlink(f.tmp)  # after a commit, only those not renamed are still there


def aligned(buf: pa.Buffer, alignment: int = 64) -> pa.Buffer:
    """`buf`, or an aligned copy of it: a card's bytes inside a received bundle batch start at
    any offset, and tensors are read in place only when aligned to their element size."""
    if buf.address % alignment == 0:
        return buf
    out = pa.allocate_buffer(buf.size)  # Arrow's pool: 64-byte aligned
    memoryview(out).cast("B")[:] = memoryview(buf).cast("B")  # type: ignore[index]
    return out


FSYNC_THREADS = 16


def parallel_map(fn: Any, items: Sequence[Any], threads: int = FSYNC_THREADS) -> list[Any]:
    """`[fn(x) for x in items]` on up to `threads` short-lived daemon threads (for calls that
    release the GIL, like fsync); `fn` must not raise. Bounded: every thread ends with the list."""
    out: list[Any] = [None] * len(items)
    it = iter(range(len(items)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            out[i] = fn(items[i])

    ts = [
        threading.Thread(target=work, name="loraflight-fsync", daemon=True)
        for _ in range(min(threads, len(items)))
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


__all__ = ["FSYNC_THREADS", "BundleReceiver", "GroupTarget", "VerifiedFile", "parallel_map"]
