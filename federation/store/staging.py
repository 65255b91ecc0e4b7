"""Receiving a card: batches to a temp file while two worker threads hash, check and write.

`StagedCard` is what `Store.stage` returns. It only needs a `StagingTarget` from the store
(a temp path, the commit of a verified temp file, the final path of a digest): the
threads live here, the index and the rename in `store`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from loraflight.engine.card import MAX_ROWS, METADATA_KEY, CardDigest, CardHeader, LoRACard
from loraflight.errors import CardError, StoreError

from ..pause import pause_point
from ..protocol import CatalogEntry
from .disk import disk_error, start_writeback
from .values import check_batch_finite, hash_batch, plain_schema


class StagingTarget(Protocol):
    """What a staged card needs from its store."""

    def temp_path(self) -> Path: ...

    def path_of(self, digest: str) -> Path: ...

    def commit_file(
        self,
        tmp: Path,
        header: CardHeader,
        rows: int,
        source: str,
        published: bool,
        pinned: bool,
        locations: Iterable[str],
    ) -> CatalogEntry: ...

    def get(self, digest: str, *, touch: bool = True) -> LoRACard: ...


_WRITEBACK_STEP = 4 << 20
_WRITE_BUFFER = 256 << 10


def _with_path(card: LoRACard, path: Path) -> LoRACard:
    """`card` (already structurally checked) as the card mapped at `path` (its renamed file)."""
    moved = copy.copy(card)
    moved._path = path
    return moved


class StagedCard:
    """A card being received: batches go to a temp file while hashed; commit or abort.

    Use as a context manager: leaving the block without `commit` aborts and deletes the
    temp file, so a failed transfer leaves nothing behind.
    """

    def __init__(
        self,
        store: StagingTarget,
        schema: pa.Schema,
        *,
        rows: int | None,
        max_bytes: int | None,
        expect_digest: str | None = None,
        expect: CatalogEntry | None = None,
    ) -> None:
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise CardError("not a loraflight card: the stream's schema has no 'loraflight' header")
        if expect is not None and expect.header_json and raw == expect.header_json:
            self.header = expect.header  # the very bytes the listing's header was parsed from
        else:
            self.header = CardHeader.from_json(raw)
        if expect is not None and expect_digest is None:
            expect_digest = expect.digest
        if not self.header.digest:
            raise CardError(f"{self.header.ref}: the header carries no digest")
        if expect_digest is not None and self.header.digest != expect_digest:
            raise CardError(
                f"{self.header.ref}: the stream's header names digest {self.header.digest[:16]}… but "
                f"{expect_digest[:16]}… was requested"
            )
        if not schema.equals(plain_schema(self.header.dtype), check_metadata=False):
            raise CardError(f"{self.header.ref}: the stream's schema is not a {self.header.dtype} card's")
        self._store = store
        self._schema = schema
        self._rows_expected = rows
        self._max_bytes = max_bytes
        self._digest = CardDigest(self.header, rows) if rows is not None else None
        self.bytes_received = 0
        self.rows_received = 0
        self.batches = 0
        self._modules: set[str] = set()  # module names received so far (a name comes once)
        self._batches_in = 0
        self._done = False
        # Two workers run while the caller receives the next batch: one hashes (sha256 is the
        # longest step), the other checks values and writes the temp file (hashlib, numpy and
        # Arrow's file writes release the GIL). A one-batch card needs neither: it is processed
        # inline at commit, so small cards start no thread and build no queue.
        self._steps = (self._hash_step, self._write_step)
        self._queues: tuple[queue.Queue[pa.RecordBatch | None], ...] = ()
        self._workers: list[threading.Thread] = []
        self._worker_error: BaseException | None = None
        self._pending: pa.RecordBatch | None = None
        self._checked_values = False
        self.card: LoRACard | None = None  # after commit: the stored card, mapped
        self._written_back = 0  # bytes of the temp file handed to writeback (_start_writeback)
        self.tmp = store.temp_path()
        try:
            # a native file: writes release the GIL while the receiver and hasher run. Buffered:
            # the IPC writer's many small pieces (metadata, offsets, padding) go out in one
            # write() and its position queries cost no lseek; tensor buffers pass straight through.
            self._raw: Any = pa.OSFile(str(self.tmp), "wb")
            self._file: Any = pa.BufferedOutputStream(self._raw, _WRITE_BUFFER)
            self._writer = pa.ipc.new_file(
                self._file, schema, options=pa.ipc.IpcWriteOptions(compression=None)
            )
        except OSError as e:
            self.abort()
            raise disk_error(e, f"cannot start receiving {self.header.ref}") from None

    def __enter__(self) -> StagedCard:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Hash and append one batch; refuses past the size limit or the advertised rows."""
        self._check_stream_limits(batch)
        self._raise_worker_error()
        if not self._workers:
            if self._pending is None:
                self._pending = batch  # a one-batch card is processed inline at commit: no threads
                return
            self._queues = tuple(queue.Queue(maxsize=4) for _ in self._steps)
            for i in range(len(self._steps)):
                t = threading.Thread(target=self._work, args=(i,), name=f"loraflight-stage-{i}", daemon=True)
                t.start()
                self._workers.append(t)
            first, self._pending = self._pending, None
            self._put_all(first)
        self._put_all(batch)

    def _check_stream_limits(self, batch: pa.RecordBatch) -> None:
        """Every limit, checked on each batch before it is written: bytes (advertised or
        allowed), rows (advertised, and a card's most), batches (no more than rows) and module
        names (each once), so an endless or repeating stream stops at its first excess."""
        n = batch.get_total_buffer_size()
        self.bytes_received += n
        self.rows_received += batch.num_rows
        if self._max_bytes is not None and self.bytes_received > self._max_bytes:
            raise CardError(
                f"{self.header.ref}: received {self.bytes_received} bytes, more than the "
                f"{self._max_bytes} advertised or allowed; transfer refused"
            )
        if self._rows_expected is not None and self.rows_received > self._rows_expected:
            raise CardError(
                f"{self.header.ref}: received more rows than the {self._rows_expected} advertised"
            )
        if self.rows_received > MAX_ROWS:
            raise CardError(
                f"{self.header.ref}: received more than {MAX_ROWS} modules, a card's most; refused"
            )
        self._batches_in += 1
        if self._batches_in > self.rows_received + 16:  # a batch carries at least one module
            raise CardError(f"{self.header.ref}: the stream sent more batches than modules; refused")
        names = batch.column(0).to_pylist() if batch.num_columns else []
        fresh = set(names)
        if len(fresh) != len(names) or not fresh.isdisjoint(self._modules):
            dup = next((m for m in names if m in self._modules or names.count(m) > 1), "?")
            raise CardError(
                f"{self.header.ref}: module {str(dup)[:200]!r} arrived twice; the stream is refused"
            )
        self._modules |= fresh

    def _put_all(self, item: pa.RecordBatch | None) -> None:
        deadline = time.monotonic() + 600.0
        for q in self._queues:
            while True:  # bounded: the worker drains its queue or fails
                try:
                    q.put(item, timeout=0.5)
                    break
                except queue.Full:
                    if item is not None:
                        self._raise_worker_error()
                    if time.monotonic() > deadline:
                        raise StoreError(f"{self.header.ref}: the store writer stalled for 600 s") from None

    def _raise_worker_error(self) -> None:
        if self._worker_error is not None:
            raise self._worker_error

    def _hash_step(self, batch: pa.RecordBatch) -> None:
        if self._digest is not None:
            hash_batch(self._digest, batch, self.header.dtype)

    def _write_step(self, batch: pa.RecordBatch) -> None:
        if self._digest is not None:
            check_batch_finite(batch, self.header.dtype)
        try:
            self._writer.write_batch(batch)
            if self._workers:  # a multi-batch card: let the disk start on what is written
                pos = self._file.tell()
                if pos - self._written_back >= _WRITEBACK_STEP:
                    start_writeback(self._raw.fileno(), self._written_back, pos - self._written_back)
                    self._written_back = pos
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, OSError):
                raise disk_error(e, f"cannot write {self.header.ref}") from None
            raise StoreError(f"cannot write {self.header.ref}: {e}") from None
        self.batches += 1
        pause_point("stage_batches", self.batches)

    def _work(self, i: int) -> None:
        q, step = self._queues[i], self._steps[i]
        for _ in range(100_000_000):  # bounded by the rows limit long before this
            batch = q.get()
            if batch is None:
                return
            if self._worker_error is not None:
                continue  # drain without work after a failure
            try:
                step(batch)
            except BaseException as e:
                self._worker_error = e

    def _finish_worker(self) -> None:
        """Stop the workers after they drained their queues (bounded) and re-raise an error."""
        if self._pending is not None:
            first, self._pending = self._pending, None
            if self._worker_error is None:
                for step in self._steps:
                    step(first)
        if self._workers:
            self._put_all(None)
            deadline = time.monotonic() + 600.0
            for t in self._workers:
                t.join(max(0.0, deadline - time.monotonic()))
            self._workers = []
        self._raise_worker_error()
        self._checked_values = self._digest is not None

    def received_digest(self) -> str | None:
        """Wait for the workers to finish what was received; the digest of it (None when the
        row count was not known up front, so nothing was hashed while receiving)."""
        self._finish_worker()
        return self._digest.hexdigest() if self._digest is not None else None

    def commit(
        self,
        *,
        source: str = "local",
        published: bool = False,
        pinned: bool = False,
        locations: Iterable[str] = (),
    ) -> CatalogEntry:
        """fsync, verify (structure, values, digest, trust, conflicts), rename, index."""
        if self._done:
            raise StoreError("this staged card was already committed or aborted")
        try:
            self._finish_worker()
            try:
                self._writer.close()
                assert self._file is not None
                try:
                    self._file.flush()
                    os.fsync(self._raw.fileno())  # the writer's own descriptor: no second open
                finally:
                    self._file.close()  # closes the raw file too
                    self._file = self._raw = None
            except OSError as e:
                raise disk_error(e, f"cannot store {self.header.ref}") from None
            except pa.ArrowException as e:
                raise StoreError(f"cannot store {self.header.ref}: {e}") from None
            pause_point("after_fsync")
            if self._rows_expected is not None and self.rows_received != self._rows_expected:
                raise CardError(
                    f"{self.header.ref}: received {self.rows_received} rows, but {self._rows_expected} "
                    "were advertised (truncated transfer)"
                )
            card = LoRACard.open(self.tmp)
            try:
                digest = (
                    self._digest.hexdigest()
                    if self._digest is not None
                    else card.digest_job(threaded=False).result()
                )
                if digest != self.header.digest:
                    raise CardError(
                        f"{self.header.ref}: digest mismatch: the header says {self.header.digest[:16]}… but "
                        f"the received content hashes to {digest[:16]}…; the card was tampered with or "
                        "corrupted in transit; refused"
                    )
                if card.header != self.header:  # the file's own header is the one checked
                    raise CardError(
                        f"{self.header.ref}: the written card's header differs from the stream's; refused"
                    )
                if not self._checked_values:
                    card.check_values()  # else checked batch by batch while receiving
            except BaseException:
                del card
                raise
            entry = self._store.commit_file(
                self.tmp, self.header, self.rows_received, source, published, pinned, locations
            )
            # The mapping survives the rename: the checked card, renamed, is the stored card
            # (no second open, no second structural pass).
            if entry.digest == self.header.digest:
                self.card = _with_path(card, self._store.path_of(entry.digest))
            else:  # the store kept the other card of an upgrade pair (engine.card.upgrade_pair)
                del card
                self.card = self._store.get(entry.digest, touch=False)
            self._done = True
            return entry
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._done = True
        self._pending = None
        if self._workers:
            self._worker_error = self._worker_error or StoreError("aborted")
            with contextlib.suppress(BaseException):
                self._finish_worker()
        with contextlib.suppress(Exception):
            self._writer.close()
        for attr in ("_file", "_raw"):
            if getattr(self, attr, None) is not None:
                with contextlib.suppress(Exception):
                    getattr(self, attr).close()
                setattr(self, attr, None)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


__all__ = ["StagedCard", "StagingTarget"]
