"""The node's card store: card files named by digest plus a SQLite index of their headers.

Theory of operation
-------------------
Layout under `root`::

    cards/<digest>.lora.arrow   immutable card files (written to tmp/, fsynced, renamed)
    tmp/                        files being received; emptied on every open
    index.sqlite                headers, flags, catalog epoch, known locations, trust

A card enters in this order: bytes to a temp file (hashed as they arrive when the row
count is known) -> fsync -> structural open of the temp file, values, digest, trust policy
and name@version conflict checks -> rename into cards/ -> fsync the directory -> one SQLite
transaction (row + epoch bump). A crash before the rename leaves only a temp file (deleted
on open); after it, an orphan file the next open re-verifies and re-indexes; rows whose
file is missing are dropped. So a killed node restarts with a consistent store and never
holds a partial or unverified card.

The catalog epoch only grows: every add and remove bumps it in the same transaction.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import itertools
import json
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from loraflight.engine.card import CARD_SUFFIX, METADATA_KEY, CardDigest, CardHeader, LoRACard
from loraflight.engine.card import check_digest as _check_digest
from loraflight.engine.keys import load_public_b64, signer_id
from loraflight.errors import CardError, CardNotFound, ConflictError, StoreError, TrustError
from loraflight.files import fsync_dir

from . import trust as _trust
from ._testing import pause_point
from .protocol import CatalogEntry, Criteria

log = logging.getLogger(__name__)

Listener = Callable[[str, CatalogEntry], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cards (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_model TEXT,
    tags TEXT NOT NULL,
    size INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    source TEXT NOT NULL,
    signer TEXT,
    signer_key TEXT,
    created TEXT,
    epoch INTEGER NOT NULL,
    last_use REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    published INTEGER NOT NULL DEFAULT 0,
    header TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS cards_epoch ON cards (epoch);
CREATE TABLE IF NOT EXISTS locations (
    digest TEXT NOT NULL, uri TEXT NOT NULL, seen REAL NOT NULL, PRIMARY KEY (digest, uri)
);
CREATE TABLE IF NOT EXISTS owners (name TEXT PRIMARY KEY, signer_key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trusted (
    key TEXT PRIMARY KEY, signer TEXT NOT NULL, label TEXT NOT NULL, names TEXT NOT NULL
);
"""
_COLS = "digest, name, version, base_model, tags, size, rows, source, pinned, published, header, epoch"
MAX_LOCATIONS = 32  # remembered per digest
TOUCH_INTERVAL_S = 10.0  # LRU resolution: a card's last use is written at most this often


def _is_enospc(e: OSError) -> bool:
    import errno

    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_error(e: OSError, what: str) -> StoreError:
    if _is_enospc(e):
        return StoreError(f"{what}: the disk is full ({e.strerror}); free space or raise the store's quota")
    return StoreError(f"{what}: {e.strerror or e}")


_EXP_MASKS = {"float32": ("<u4", 0x7F800000), "float16": ("<u2", 0x7C00), "bfloat16": ("<u2", 0x7F80)}
_FINITE_CHUNK = 1 << 20


def _finite_bytes(mv: memoryview, dtype: str) -> bool:
    """No NaN/Inf among the values in `mv` (any alignment): exponent bits not all ones."""
    wdt, mask = _EXP_MASKS[dtype]
    words = np.frombuffer(mv, dtype=wdt)
    for i in range(0, words.size, _FINITE_CHUNK):
        chunk = words[i : i + _FINITE_CHUNK]
        if chunk.size and int(np.bitwise_and(chunk, mask).max()) == mask:
            return False
    return True


_PLAIN_SCHEMAS: dict[str, pa.Schema] = {}


def _plain_schema(dtype: str) -> pa.Schema:
    """The card schema of `dtype` without metadata (built once per dtype)."""
    s = _PLAIN_SCHEMAS.get(dtype)
    if s is None:
        from loraflight.engine.card import card_schema

        s = _PLAIN_SCHEMAS[dtype] = card_schema(dtype)
    return s


def _value_span(arr: pa.Array, n: int, itemsize: int, label: str) -> tuple[memoryview, np.ndarray]:
    """The bytes the `n` rows of a list column span in its values buffer (bounds-checked), and
    its `n + 1` offsets relative to the first."""
    obuf = arr.buffers()[1]
    if obuf is None or obuf.size < (arr.offset + n + 1) * 4:
        raise CardError(f"{label}: offsets buffer is missing or shorter than the row count")
    off = np.frombuffer(obuf, dtype="<i4", count=n + 1, offset=arr.offset * 4).astype(np.int64)
    values = arr.values
    vbufs = values.buffers()
    vbuf = vbufs[1] if len(vbufs) > 1 else None
    vsize = 0 if vbuf is None else vbuf.size
    lo = values.offset * itemsize + int(off[0]) * itemsize
    hi = values.offset * itemsize + int(off[n]) * itemsize
    if lo < 0 or hi < lo or hi > vsize:
        raise CardError(f"{label}: offsets point outside the values buffer (corrupt batch)")
    mv = memoryview(vbuf)[lo:hi] if vbuf is not None else memoryview(b"")
    return mv, off - off[0]


def check_batch_finite(batch: pa.RecordBatch, dtype: str) -> None:
    """Refuse a received batch holding a NaN or Inf: one vectorised pass over each tensor
    column's whole value span (any alignment); a per-row scan only to name the culprit."""
    from loraflight.engine.card import DTYPES

    if batch.num_columns != 7:
        raise CardError(f"a card batch has 7 columns, this one has {batch.num_columns}")
    n = batch.num_rows
    size = DTYPES[dtype].itemsize
    for k, label in ((5, "lora_a"), (6, "lora_b")):
        mv, off = _value_span(batch.column(k), n, size, label)
        if _finite_bytes(mv, dtype):
            continue
        modules = batch.column(0).to_pylist()
        for i in range(n):
            lo, hi = int(off[i]) * size, int(off[i + 1]) * size
            if 0 <= lo <= hi and not _finite_bytes(mv[lo:hi], dtype):
                raise CardError(f"module {modules[i]!r}: {label} has NaN or Inf values; refused")
        raise CardError(f"{label} has NaN or Inf values; refused")


def hash_batch(digest: CardDigest, batch: pa.RecordBatch, dtype: str, check_finite: bool = False) -> None:
    """Feed one received batch to `digest` from its raw bytes (and check values are finite).

    Buffers received over Flight are often misaligned, so this walks the Arrow buffers as
    bytes (bounds-checked against every advertised shape) instead of making numpy views;
    the full structural check runs on the written file before commit.
    """
    from loraflight.engine.card import DTYPES

    if batch.num_columns != 7:
        raise CardError(f"a card batch has 7 columns, this one has {batch.num_columns}")
    for i, c in enumerate(batch.columns):
        if c.null_count:
            raise CardError(f"column {batch.schema.field(i).name!r} has nulls; a card has none")
    n = batch.num_rows
    cols = batch.columns
    modules = cols[0].to_pylist()
    ranks, alphas, fins, fouts = (cols[k].to_pylist() for k in (1, 2, 3, 4))
    size = DTYPES[dtype].itemsize
    spans = []
    for k, label in ((5, "lora_a"), (6, "lora_b")):
        arr = cols[k]
        obuf = arr.buffers()[1]
        if obuf is None or obuf.size < (arr.offset + n + 1) * 4:
            raise CardError(f"{label}: offsets buffer is missing or shorter than the row count")
        off = np.frombuffer(obuf, dtype="<i4", count=n + 1, offset=arr.offset * 4).astype(np.int64)
        values = arr.values
        vbufs = values.buffers()
        vbuf = vbufs[1] if len(vbufs) > 1 else None
        vsize = 0 if vbuf is None else vbuf.size
        base = values.offset * size
        spans.append((off, vbuf, vsize, base, label))
    for i in range(n):
        r, fi, fo = int(ranks[i]), int(fins[i]), int(fouts[i])
        parts = []
        for (off, vbuf, vsize, base, label), count in zip(spans, (r * fi, fo * r), strict=True):
            lo, hi = base + int(off[i]) * size, base + int(off[i + 1]) * size
            if off[i + 1] - off[i] != count or lo < 0 or hi > vsize or r < 1 or fi < 1 or fo < 1:
                raise CardError(
                    f"module {modules[i]!r}: {label} holds {int(off[i + 1] - off[i])} values for shape "
                    f"needing {count}, or points outside its buffer (corrupt batch)"
                )
            parts.append(memoryview(vbuf)[lo:hi] if vbuf is not None else memoryview(b""))
        if check_finite:
            for label, part in zip(("lora_a", "lora_b"), parts, strict=True):
                if not _finite_bytes(part, dtype):
                    raise CardError(f"module {modules[i]!r}: {label} has NaN or Inf values; refused")
        digest.update_row(str(modules[i]), r, float(alphas[i]), fi, fo, parts[0], parts[1])


_WRITEBACK_STEP = 4 << 20
_WRITE_BUFFER = 256 << 10
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_sync_file_range: Any = None  # resolved on first use; False where unavailable


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of the temp file to disk now (Linux
    `sync_file_range(SYNC_FILE_RANGE_WRITE)`, asynchronous, GIL released), so the fsync at
    commit waits only for the tail. A hint only: durability still comes from that fsync."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors: the fsync reports


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
        store: Store,
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
        if not schema.equals(_plain_schema(self.header.dtype), check_metadata=False):
            raise CardError(f"{self.header.ref}: the stream's schema is not a {self.header.dtype} card's")
        self._store = store
        self._schema = schema
        self._rows_expected = rows
        self._max_bytes = max_bytes
        self._digest = CardDigest(self.header, rows) if rows is not None else None
        self.bytes_received = 0
        self.rows_received = 0
        self.batches = 0
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
        self.tmp = store._tmp_path()
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
            raise _disk_error(e, f"cannot start receiving {self.header.ref}") from None

    def __enter__(self) -> StagedCard:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Hash and append one batch; refuses past the size limit or the advertised rows."""
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
                    _start_writeback(self._raw.fileno(), self._written_back, pos - self._written_back)
                    self._written_back = pos
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, OSError):
                raise _disk_error(e, f"cannot write {self.header.ref}") from None
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
                raise _disk_error(e, f"cannot store {self.header.ref}") from None
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
                digest = self._digest.hexdigest() if self._digest is not None else card.compute_digest()
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
            entry = self._store._commit_file(
                self.tmp, self.header, self.rows_received, source, published, pinned, locations
            )
            # The mapping survives the rename: the checked card, renamed, is the stored card
            # (no second open, no second structural pass).
            self.card = _with_path(card, self._store.path_of(entry.digest))
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


class Store:
    """Cards as files named by digest, an SQLite index, a growing epoch, an LRU byte cap."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        trust: str = "open",
    ) -> None:
        self.root = Path(root)
        self.cards_dir = self.root / "cards"
        self.tmp_dir = self.root / "tmp"
        self.max_bytes = max_bytes
        self.trust_mode = _trust.check_mode(trust)
        try:
            self.cards_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.root / "index.sqlite", check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process kill; a power loss may drop the
            # last commits but never corrupts, and repair() re-indexes any card file left over.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except OSError as e:
            raise _disk_error(e, f"cannot open the store at {self.root}") from None
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the store index at {self.root}: {e}") from None
        self._lock = threading.RLock()
        # temp names: a random prefix per Store object plus a counter (unique in tmp/ even when
        # several processes share the store; no random read per card)
        self._tmp_prefix = uuid.uuid4().hex[:16]
        self._tmp_seq = itertools.count()
        # group commit of the cards/ directory fsync (see _sync_cards_dir)
        self._dir_cond = threading.Condition(threading.Lock())
        self._dir_ticket = 0
        self._dir_synced = 0
        self._dir_syncing = False
        self._touched: dict[str, float] = {}
        self._listeners: list[Listener] = []
        self._closed = False
        self.repair()

    # -- lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tmp_path(self) -> Path:
        return self.tmp_dir / f"{self._tmp_prefix}-{next(self._tmp_seq)}.part"

    def path_of(self, digest: str) -> Path:
        return self.cards_dir / f"{_check_digest(digest)}{CARD_SUFFIX}"

    # -- listeners
    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call `callback(event, entry)` after each committed add ("added") or remove ("removed")."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unsubscribe

    def _emit(self, event: str, entry: CatalogEntry) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(event, entry)
            except Exception:
                log.exception("store listener %r failed on %s %s", cb, event, entry.ref)

    # -- epoch
    @property
    def epoch(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        return int(row[0]) if row else 0

    def _bump_epoch(self) -> int:
        # caller holds the lock inside a transaction; one statement reads and bumps
        row = self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', '1') "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
        ).fetchone()
        return int(row[0])

    # -- queries
    def _entry(self, row: tuple[Any, ...], locations: bool = True) -> CatalogEntry:
        digest, _name, _v, _bm, _tags, size, rows, source, pinned, published, header, epoch = row
        locs = self._locations_locked(digest) if locations else ()
        raw = header.encode()
        return CatalogEntry(
            header=CardHeader.from_json(raw),
            header_json=raw,
            size=size,
            rows=rows,
            locations=locs,
            source=source,
            pinned=bool(pinned),
            published=bool(published),
            epoch=epoch,
        )

    def _locations_locked(self, digest: str) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in self._db.execute(
                "SELECT uri FROM locations WHERE digest=? ORDER BY seen DESC LIMIT ?",
                (digest, MAX_LOCATIONS),
            )
        )

    def entry(self, digest: str) -> CatalogEntry | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM cards WHERE digest=?", (digest,)).fetchone()
            return self._entry(row) if row else None

    def entry_exists(self, digest: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM cards WHERE digest=?", (digest,)).fetchone() is not None

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self.entry(digest) is not None

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM cards").fetchone()[0])

    def list(self, criteria: Criteria | Mapping[str, Any] | None = None, **kw: Any) -> list[CatalogEntry]:
        """Entries matching criteria (name glob, base_model, tags, since, limit); no file is opened."""
        if criteria is None:
            criteria = Criteria.from_kwargs(kw)
        elif isinstance(criteria, Mapping):
            criteria = Criteria.from_kwargs(criteria)
        sql = f"SELECT {_COLS} FROM cards"
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        if criteria.base_model is not None:
            where.append("base_model = ?")
            args.append(criteria.base_model)
        if criteria.digest is not None:
            where.append("digest = ?")
            args.append(criteria.digest)
        if criteria.since is not None:
            where.append("epoch > ?")
            args.append(criteria.since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name, version"
        out = []
        with self._lock:
            for row in self._db.execute(sql, args).fetchall():
                e = self._entry(row)
                if criteria.matches(e.header):
                    out.append(e)
                    if criteria.limit is not None and len(out) >= criteria.limit:
                        break
        return out

    def find(self, name: str, version: int | str = "latest") -> CatalogEntry:
        """The entry for name@version (`latest`: the highest version held)."""
        with self._lock:
            if version == "latest":
                row = self._db.execute(
                    f"SELECT {_COLS} FROM cards WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            else:
                row = self._db.execute(
                    f"SELECT {_COLS} FROM cards WHERE name=? AND version=?", (name, int(version))
                ).fetchone()
            if not row:
                raise CardNotFound(f"no card {name}@{version} in this store")
            return self._entry(row)

    def get(self, digest: str, *, touch: bool = True) -> LoRACard:
        """The card mapped from its file (zero-copy); touches it for the LRU."""
        with self._lock:
            held = self._db.execute("SELECT 1 FROM cards WHERE digest=?", (digest,)).fetchone()
        if not held:
            raise CardNotFound(f"no card with digest {digest[:16]}… in this store")
        card = LoRACard.open(self.path_of(digest))
        if touch:
            self.touch(digest)
        return card

    def touch(self, digest: str, *, force: bool = False) -> None:
        """Record a use for the LRU (written at most once per TOUCH_INTERVAL_S per card)."""
        now = time.time()
        with self._lock:
            if not force and now - self._touched.get(digest, 0.0) < TOUCH_INTERVAL_S:
                return
            if len(self._touched) > 100_000:
                self._touched.clear()
            self._touched[digest] = now
            self._db.execute("UPDATE cards SET last_use=? WHERE digest=?", (now, digest))

    def stats(self) -> dict[str, int]:
        with self._lock:
            n, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size),0) FROM cards").fetchone()
            pinned = self._db.execute("SELECT COUNT(*) FROM cards WHERE pinned=1").fetchone()[0]
            pub = self._db.execute("SELECT COUNT(*) FROM cards WHERE published=1").fetchone()[0]
        return {"cards": int(n), "bytes": int(size), "pinned": int(pinned), "published": int(pub)}

    # -- locations
    def locations(self, digest: str) -> builtins.list[str]:
        with self._lock:
            return [
                r[0]
                for r in self._db.execute(
                    "SELECT uri FROM locations WHERE digest=? ORDER BY seen DESC LIMIT ?",
                    (digest, MAX_LOCATIONS),
                )
            ]

    def add_locations(self, digest: str, uris: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for u in list(uris)[:MAX_LOCATIONS]:
                    self._db.execute(
                        "INSERT OR REPLACE INTO locations (digest, uri, seen) VALUES (?, ?, ?)",
                        (digest, u, now),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- flags
    def pin(self, digest: str, pinned: bool = True) -> None:
        with self._lock:
            cur = self._db.execute("UPDATE cards SET pinned=? WHERE digest=?", (int(pinned), digest))
            if cur.rowcount == 0:
                raise CardNotFound(f"no card with digest {digest[:16]}… to pin")

    def unpin(self, digest: str) -> None:
        self.pin(digest, False)

    def set_published(self, digest: str, published: bool = True) -> None:
        with self._lock:
            self._db.execute("UPDATE cards SET published=? WHERE digest=?", (int(published), digest))

    # -- trust
    def trusted_keys(self) -> dict[str, _trust.TrustedKey]:
        with self._lock:
            rows = self._db.execute("SELECT key, signer, label, names FROM trusted").fetchall()
        return {k: _trust.TrustedKey(k, s, lbl, tuple(json.loads(n))) for k, s, lbl, n in rows}

    def trust_add(self, key_b64: str, *, label: str = "", names: Iterable[str] = ()) -> _trust.TrustedKey:
        try:
            load_public_b64(key_b64)
        except (ValueError, TypeError) as e:
            raise TrustError(f"not an Ed25519 public key (base64 of 32 raw bytes): {e}") from None
        tk = _trust.TrustedKey(key_b64, signer_id(key_b64), label, tuple(names))
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO trusted (key, signer, label, names) VALUES (?, ?, ?, ?)",
                (tk.key, tk.signer, tk.label, json.dumps(list(tk.names))),
            )
        return tk

    def trust_remove(self, key_or_signer: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM trusted WHERE key=? OR signer=?", (key_or_signer, key_or_signer)
            )
            return cur.rowcount > 0

    def owner(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT signer_key FROM owners WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def check_admission(self, header: CardHeader) -> CatalogEntry | None:
        """Trust policy and name@version conflict checks; returns the existing entry of this digest."""
        with self._lock:
            # one query finds both this digest and any other digest holding name@version
            rows = self._db.execute(
                "SELECT digest FROM cards WHERE digest=? OR (name=? AND version=?)",
                (header.digest, header.name, header.version),
            ).fetchall()
            if any(r[0] == header.digest for r in rows):
                return self.entry(header.digest)
            if rows:
                raise ConflictError(
                    f"{header.ref} already exists here with digest {rows[0][0][:16]}…, and this card has "
                    f"digest {header.digest[:16]}…: cards are immutable, publish a new version instead"
                )
            if self.trust_mode == "open":  # trusted keys and owners only matter under 'signed'
                _trust.check_entry(header, mode="open", trusted={}, owner=None)
            else:
                _trust.check_entry(
                    header, mode=self.trust_mode, trusted=self.trusted_keys(), owner=self.owner(header.name)
                )
        return None

    # -- adding
    def stage(
        self,
        schema: pa.Schema,
        *,
        rows: int | None = None,
        max_bytes: int | None = None,
        expect_digest: str | None = None,
        expect: CatalogEntry | None = None,
    ) -> StagedCard:
        """Start receiving a card whose stream has `schema`; see StagedCard.

        `expect`: the listing entry being fetched; its digest is required and, when the stream
        carries byte-identical header JSON, its already parsed header is reused.
        """
        return StagedCard(
            self, schema, rows=rows, max_bytes=max_bytes, expect_digest=expect_digest, expect=expect
        )

    def add(
        self,
        card_or_path: LoRACard | str | os.PathLike[str],
        *,
        source: str = "local",
        published: bool = False,
        pinned: bool = False,
        locations: Iterable[str] = (),
    ) -> CatalogEntry:
        """Verify (values, digest, trust, conflicts) and store a card; returns its entry.

        Adding a digest already held only updates its flags and locations.
        """
        card = card_or_path if isinstance(card_or_path, LoRACard) else LoRACard.open(card_or_path)
        card.verify()
        existing = self.check_admission(card.header)
        if existing is not None:
            return self._merge_existing(existing, published, pinned, locations)
        tmp = self._tmp_path()
        try:
            try:
                with open(tmp, "wb") as f:
                    card.write_to(f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise _disk_error(e, f"cannot store {card.ref}") from None
            pause_point("after_fsync")
            return self._commit_file(tmp, card.header, len(card), source, published, pinned, locations)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _merge_existing(
        self, existing: CatalogEntry, published: bool, pinned: bool, locations: Iterable[str]
    ) -> CatalogEntry:
        with self._lock:
            self._db.execute(
                "UPDATE cards SET published = MAX(published, ?), pinned = MAX(pinned, ?) WHERE digest=?",
                (int(published), int(pinned), existing.digest),
            )
        locs = list(locations)
        if locs:
            self.add_locations(existing.digest, locs)
        return self.entry(existing.digest) or existing

    def _commit_file(
        self,
        tmp: Path,
        header: CardHeader,
        rows: int,
        source: str,
        published: bool,
        pinned: bool,
        locations: Iterable[str],
    ) -> CatalogEntry:
        """Rename a verified temp file into cards/ and index it (trust + conflicts re-checked)."""
        existing = self.check_admission(header)
        if existing is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return self._merge_existing(existing, published, pinned, locations)
        final = self.path_of(header.digest)
        size = os.path.getsize(tmp)
        pause_point("before_rename")
        try:
            os.replace(tmp, final)
            self._sync_cards_dir()
        except OSError as e:
            raise _disk_error(e, f"cannot store {header.ref}") from None
        pause_point("before_index_commit")
        try:
            entry = self._index(header, rows, size, source, published, pinned, locations)
        except BaseException:
            with self._lock:
                held = self._db.execute("SELECT 1 FROM cards WHERE digest=?", (header.digest,)).fetchone()
            if not held:
                with contextlib.suppress(OSError):
                    os.unlink(final)
            raise
        self._emit("added", entry)
        self.evict(keep=entry.digest)
        return entry

    def _sync_cards_dir(self) -> None:
        """fsync cards/ so a rename made before this call survives a crash (group commit).

        Concurrent committers share one fsync: a caller whose rename is covered by an fsync
        that *started* after its rename returns when that fsync ends, instead of queueing its
        own. Bounded: each round either runs an fsync or waits for the one in flight.
        """
        with self._dir_cond:
            self._dir_ticket += 1
            mine = self._dir_ticket
            for _ in range(10_000):
                if self._dir_synced >= mine:
                    return
                if not self._dir_syncing:
                    self._dir_syncing = True
                    covers = self._dir_ticket  # every rename that took a ticket so far
                    break
                self._dir_cond.wait(5.0)
            else:
                covers = mine  # pathological contention: sync on our own below
                self._dir_syncing = True
        done = False
        try:
            fsync_dir(self.cards_dir)
            done = True
        finally:
            with self._dir_cond:
                self._dir_syncing = False
                if done:
                    self._dir_synced = max(self._dir_synced, covers)
                self._dir_cond.notify_all()

    def _index(
        self,
        header: CardHeader,
        rows: int,
        size: int,
        source: str,
        published: bool,
        pinned: bool,
        locations: Iterable[str],
    ) -> CatalogEntry:
        now = time.time()
        header_text = header.to_json().decode()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # re-checked inside the transaction: another writer may have won the race
                row = self._db.execute(
                    "SELECT digest FROM cards WHERE name=? AND version=?", (header.name, header.version)
                ).fetchone()
                if row and row[0] != header.digest:
                    raise ConflictError(
                        f"{header.ref} already exists here with digest {row[0][:16]}…: cards are immutable"
                    )
                inserted = not row
                epoch = 0
                if inserted:
                    epoch = self._bump_epoch()
                    self._db.execute(
                        "INSERT INTO cards (digest, name, version, base_model, tags, size, rows, source, "
                        "signer, signer_key, created, epoch, last_use, pinned, published, header) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            header.digest,
                            header.name,
                            header.version,
                            header.base_model,
                            json.dumps(list(header.tags)),
                            size,
                            rows,
                            source,
                            header.signer,
                            header.signer_key,
                            header.created,
                            epoch,
                            now,
                            int(pinned),
                            int(published),
                            header_text,
                        ),
                    )
                    if header.signer_key is not None:
                        self._db.execute(
                            "INSERT OR IGNORE INTO owners (name, signer_key) VALUES (?, ?)",
                            (header.name, header.signer_key),
                        )
                locs = list(locations)[:MAX_LOCATIONS]
                if locs:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO locations (digest, uri, seen) VALUES (?, ?, ?)",
                        [(header.digest, u, now) for u in locs],
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if not inserted:
                entry = self.entry(header.digest)
                assert entry is not None
                return entry
            # Just inserted: the entry is what we wrote (no re-read, no second header parse);
            # only the locations are read back, the table may hold older ones for this digest.
            return CatalogEntry(
                header=header,
                size=size,
                rows=rows,
                locations=self._locations_locked(header.digest),
                source=source,
                pinned=bool(pinned),
                published=bool(published),
                epoch=epoch,
                header_json=header_text.encode(),
            )

    # -- removing
    def remove(self, digest: str) -> CatalogEntry:
        """Drop a card from the index and delete its file (open maps stay valid)."""
        with self._lock:
            entry = self.entry(digest)
            if entry is None:
                raise CardNotFound(f"no card with digest {digest[:16]}… to remove")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM cards WHERE digest=?", (digest,))
                self._db.execute("DELETE FROM locations WHERE digest=?", (digest,))
                self._bump_epoch()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        with contextlib.suppress(OSError):
            os.unlink(self.path_of(digest))
        self._emit("removed", entry)
        return entry

    def evict(self, keep: str | None = None) -> builtins.list[CatalogEntry]:
        """Remove least-recently-used fetched cards (never pinned, published or local) over max_bytes.

        `keep` (the card just added) is never chosen, so an add is not undone by its own eviction.
        """
        if self.max_bytes is None:
            return []
        removed = []
        for _ in range(100_000):  # bounded: at most one pass over the catalog
            with self._lock:
                total = self._db.execute("SELECT COALESCE(SUM(size),0) FROM cards").fetchone()[0]
                if total <= self.max_bytes:
                    break
                row = self._db.execute(
                    "SELECT digest FROM cards WHERE pinned=0 AND published=0 AND source!='local' "
                    "AND digest != ? ORDER BY last_use ASC LIMIT 1",
                    (keep or "",),
                ).fetchone()
            if not row:
                log.warning(
                    "store is over its cap (%d > %d bytes) but nothing is evictable", total, self.max_bytes
                )
                break
            removed.append(self.remove(row[0]))
            log.info("evicted %s (LRU, store over %d bytes)", removed[-1].ref, self.max_bytes)
        return removed

    # -- recovery
    def repair(self) -> dict[str, int]:
        """Make the index and the files agree (run on every open); returns what it did."""
        done = {"temp_removed": 0, "rows_dropped": 0, "orphans_indexed": 0, "orphans_removed": 0}
        for p in list(self.tmp_dir.iterdir())[:1_000_000]:
            with contextlib.suppress(OSError):
                p.unlink()
                done["temp_removed"] += 1
        for p in list(self.cards_dir.glob(".tmp-*")):
            with contextlib.suppress(OSError):
                p.unlink()
                done["temp_removed"] += 1
        with self._lock:
            rows = self._db.execute("SELECT digest FROM cards").fetchall()
        indexed = {r[0] for r in rows}
        for (digest,) in rows:
            if not self.path_of(digest).exists():
                with self._lock:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.execute("DELETE FROM cards WHERE digest=?", (digest,))
                    self._db.execute("DELETE FROM locations WHERE digest=?", (digest,))
                    self._bump_epoch()
                    self._db.execute("COMMIT")
                done["rows_dropped"] += 1
                log.warning("store repair: dropped index row %s whose file is missing", digest[:16])
        for p in self.cards_dir.glob(f"*{CARD_SUFFIX}"):
            digest = p.name[: -len(CARD_SUFFIX)]
            if digest in indexed:
                continue
            try:
                card = LoRACard.open(p)
                card.verify()
                if card.digest != digest:
                    raise CardError(
                        f"file name says {digest[:16]}… but the card's digest is {card.digest[:16]}…"
                    )
                self.check_admission(card.header)
                n = len(card)
                header = card.header
                del card
                self._index(header, n, p.stat().st_size, "recovered", False, False, ())
                done["orphans_indexed"] += 1
                log.warning("store repair: re-indexed orphan card file %s", p.name)
            except (CardError, ConflictError) as e:
                with contextlib.suppress(OSError):
                    p.unlink()
                done["orphans_removed"] += 1
                log.warning("store repair: removed card file %s: %s", p.name, e)
        return done


__all__ = ["Listener", "StagedCard", "Store"]
