"""Format 2: every record batch is a piece with its own BLAKE3 hash (docs/format.md, section 11).

Pure rules plus the one threaded job that applies them:

- `piece_prefix` / `piece_hash`: a piece's canonical encoding (framing, then all of its rows'
  A values end to end, then all B values) and its BLAKE3 hash. An opened card's A (B) values of
  one batch are one contiguous span of the mapped file, so a piece is hashed in three calls on
  big buffers: BLAKE3 releases the GIL and spreads them over `max_threads` cores.
- `header_digest`: the card digest, BLAKE3 over the canonical header (piece list included).
- `verify_piece(header, index, batch)`: one received batch checked against the header alone,
  from any peer, in any order.
- `hash_scan`: a piece's hash and its NaN/Inf scan in one read, chunk by chunk (verify).
- `PieceJob`: all pieces of a card hashed in a helper thread (GIL released) while the caller
  does other work (values scan, copy into the model); `result()` names every bad piece.
"""

from __future__ import annotations

import _thread
import dataclasses
import functools
import itertools
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import blake3
import pyarrow as pa

from loraflight.errors import CardError

from .batches import BatchRun, ModuleLoRA, batch_run, contiguous, group_rows
from .header import CardHeader, canonical_json
from .helpers import submit as on_helper
from .values import FINITE_CHUNK_BYTES, FiniteScan, all_finite, check_finite

PIECE_DOMAIN = b"loraflight-piece-v2\x00"
CARD2_DOMAIN = b"loraflight-card-v2\x00"

_u32 = struct.Struct("<I").pack
_u64 = struct.Struct("<Q").pack
_MULTI_BYTES = 1 << 20  # from this piece size BLAKE3 may use several threads
_HASH_TIMEOUT_S = 60.0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


CPUS = _cpus()


def idle_cores() -> int:
    """Cores idle right now (Linux /proc/loadavg counts running tasks, this thread included);
    all of them when that cannot be read. A helper thread on a busy core only adds switches."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return CPUS - 1
    return max(0, CPUS - running)


def piece_prefix(
    index: int,
    first_row: int,
    dtype: str,
    names: Sequence[str],
    ranks: Sequence[int],
    alphas: Sequence[float],
    fins: Sequence[int],
    fouts: Sequence[int],
) -> bytes:
    """The framing a piece's hash starts with: domain, position, dtype and each row's fields."""
    dt = dtype.encode()
    out = [PIECE_DOMAIN, _u64(index), _u64(first_row), _u64(len(names)), bytes((len(dt),)), dt]
    for name, r, al, fi, fo in zip(names, ranks, alphas, fins, fouts, strict=True):
        nb = name.encode()
        out += (_u32(len(nb)), nb, struct.pack("<IdQQ", r, al, fi, fo))
    return b"".join(out)


def hash_parts(prefix: bytes, a: Any, b: Any, max_threads: int = 1) -> str:
    """BLAKE3 of prefix ‖ u64(len A) A ‖ u64(len B) B (A, B: byte buffers, zero-copy)."""
    a = memoryview(a).cast("B") if not isinstance(a, memoryview) or a.format != "B" else a
    b = memoryview(b).cast("B") if not isinstance(b, memoryview) or b.format != "B" else b
    mt = max_threads if a.nbytes + b.nbytes >= _MULTI_BYTES else 1
    h = blake3.blake3(prefix + _u64(a.nbytes), max_threads=mt)
    h.update(a)
    h.update(_u64(b.nbytes))
    h.update(b)
    return h.hexdigest()


def hash_scan(
    prefix: bytes, a: Any, b: Any, dtype: str, go_on: Callable[[int], bool] | None = None
) -> tuple[str, bool] | None:
    """`hash_parts(prefix, a, b)` (one thread) and whether every value of the flat arrays `a`
    and `b` is finite, in one read of the values: each chunk of `FINITE_CHUNK_BYTES` (within
    the core's L2) is hashed and then scanned while it is still in cache, rather than the
    whole piece hashed and then read from memory again by the scan. `go_on(chunks done)` is
    asked before each chunk; when it says False the work stops and None is returned."""
    h = blake3.blake3(prefix)
    finite = True
    done = 0
    for flat in (a, b):
        mv = contiguous(flat).data.cast("B")
        h.update(_u64(mv.nbytes))
        scan = FiniteScan(flat, dtype)
        step, size = scan.step, flat.itemsize
        for i in range(0, flat.size, step):
            if go_on is not None and not go_on(done):
                return None
            h.update(mv[i * size : (i + step) * size])
            if finite and not scan.check(i, i + step):
                finite = False
            done += 1
    return h.hexdigest(), finite


def scan_chunks(a: Any, b: Any) -> int:
    """How many chunks `hash_scan` takes over the flat arrays `a` and `b`."""
    return sum(-(-x.nbytes // FINITE_CHUNK_BYTES) for x in (a, b))


def _run_parts(index: int, first_row: int, dtype: str, run: BatchRun) -> tuple[bytes, Any, Any]:
    prefix = piece_prefix(index, first_row, dtype, run.names, run.ranks, run.alphas, run.fins, run.fouts)
    return prefix, contiguous(run.flat_a).data.cast("B"), contiguous(run.flat_b).data.cast("B")


def piece_hash(index: int, first_row: int, dtype: str, run: BatchRun, max_threads: int = 1) -> str:
    """The BLAKE3 hash (hex) of one batch as piece `index` starting at row `first_row`."""
    return hash_parts(*_run_parts(index, first_row, dtype, run), max_threads=max_threads)


def rows_piece_hash(index: int, first_row: int, dtype: str, rows: Sequence[ModuleLoRA]) -> str:
    """`piece_hash` of rows given as `ModuleLoRA` (before they are laid out in a batch)."""
    prefix = piece_prefix(
        index,
        first_row,
        dtype,
        [m.module for m in rows],
        [m.rank for m in rows],
        [m.alpha for m in rows],
        [m.in_features for m in rows],
        [m.out_features for m in rows],
    )
    a = b"".join(contiguous(m.a).data.cast("B") for m in rows)
    b = b"".join(contiguous(m.b).data.cast("B") for m in rows)
    return hash_parts(prefix, a, b)


def header_digest(header: CardHeader) -> str:
    """The format-2 card digest: BLAKE3 over domain ‖ u64(len H) ‖ H, H the signed part."""
    head = canonical_json(header.signed_part())
    return blake3.blake3(CARD2_DOMAIN + _u64(len(head)) + head).hexdigest()


def pieces_of(groups: Sequence[Sequence[ModuleLoRA]], dtype: str) -> tuple[tuple[int, int, str], ...]:
    """The piece list of rows laid out in `groups` (one group per batch)."""
    out = []
    first = 0
    for i, g in enumerate(groups):
        out.append((first, len(g), rows_piece_hash(i, first, dtype, g)))
        first += len(g)
    return tuple(out)


def content_digest(header: CardHeader, modules: Sequence[ModuleLoRA]) -> str:
    """The digest `modules` give under `header`: its pieces rehashed over the header's row
    ranges (or the writer's layout when the header lists none that fit), then `header_digest`."""
    mods = list(modules)
    if header.pieces and sum(p[1] for p in header.pieces) == len(mods):
        groups = [mods[f : f + n] for f, n, _ in header.pieces]
    else:
        groups = group_rows(mods)
    return header_digest(dataclasses.replace(header, pieces=pieces_of(groups, header.dtype)))


def check_layout(header: CardHeader, row_counts: Sequence[int]) -> None:
    """A format-2 card's batches must be its pieces: same count, same rows each."""
    pieces = header.pieces
    if len(row_counts) != len(pieces):
        raise CardError(
            f"format-2 card has {len(row_counts)} record batches but its header lists {len(pieces)} pieces "
            "(re-batched in transit?); each record batch is one piece"
        )
    for i, (n, (_, rows, _)) in enumerate(zip(row_counts, pieces, strict=True)):
        if n != rows:
            raise CardError(
                f"record batch {i} holds {n} rows but piece {i} of the header lists {rows} "
                "(re-batched in transit?); each record batch is one piece"
            )


def bad_piece_error(header: CardHeader, bad: Sequence[int]) -> CardError:
    n = len(header.pieces)
    i = bad[0]
    first, rows, _ = header.pieces[i]
    more = f" (bad pieces: {', '.join(map(str, bad))})" if len(bad) > 1 else ""
    return CardError(
        f"{header.ref}: digest mismatch: piece {i} of {n} (rows {first}..{first + rows - 1}) does not match its BLAKE3 "
        f"hash in the header{more}; the card was tampered with or corrupted"
    )


def verify_piece(header: CardHeader, index: int, batch: pa.RecordBatch) -> str:
    """Check one record batch as piece `index` of the card `header` describes; its hash (hex).

    Structural checks first (Arrow's full validation, shapes, limits), then the BLAKE3 hash
    against the header's. Needs nothing but the header: pieces verify alone, in any order.
    Raises CardError naming the piece. Values are not checked finite here.
    """
    if header.major < 2:
        raise CardError(f"{header.ref}: format {header.format} has no pieces; verify the whole card")
    if not 0 <= index < len(header.pieces):
        raise CardError(f"{header.ref}: piece {index} does not exist; the card has {len(header.pieces)}")
    first, rows, want = header.pieces[index]
    run = batch_run(batch, header.dtype)
    if len(run.names) != rows:
        raise CardError(f"{header.ref}: piece {index} holds {len(run.names)} rows; the header lists {rows}")
    got = piece_hash(index, first, header.dtype, run, max_threads=CPUS)
    if got != want:
        raise bad_piece_error(header, [index])
    return got


class PieceStream:
    """Format-2 pieces checked while rows arrive (the receive side of `CardDigest`).

    Rows come in order; whenever a piece's rows are complete it is hashed and compared, so a
    bad piece is refused as soon as it has arrived, not after the whole card.
    """

    def __init__(self, header: CardHeader, num_rows: int) -> None:
        total = sum(p[1] for p in header.pieces)
        if num_rows != total:
            raise CardError(f"{header.ref}: {num_rows} rows advertised, but the header's pieces hold {total}")
        self._header = header
        self._index = 0
        self._fields: list[tuple[str, int, float, int, int]] = []
        self._a: list[Any] = []
        self._b: list[Any] = []

    def update_row(self, module: str, rank: int, alpha: float, fin: int, fout: int, a: Any, b: Any) -> None:
        pieces = self._header.pieces
        if self._index >= len(pieces):
            raise CardError(f"{self._header.ref}: more rows than the header's {len(pieces)} pieces hold")
        self._fields.append((module, rank, alpha, fin, fout))
        self._a.append(memoryview(a).cast("B"))
        self._b.append(memoryview(b).cast("B"))
        first, rows, want = pieces[self._index]
        if len(self._fields) == rows:
            cols = list(zip(*self._fields, strict=True))
            prefix = piece_prefix(self._index, first, self._header.dtype, *cols)  # type: ignore[arg-type]
            # the rows' buffers hashed in place, one call each (no joined copy)
            h = blake3.blake3(prefix + _u64(sum(x.nbytes for x in self._a)))
            for x in self._a:
                h.update(x)
            h.update(_u64(sum(x.nbytes for x in self._b)))
            for x in self._b:
                h.update(x)
            if h.hexdigest() != want:
                raise bad_piece_error(self._header, [self._index])
            self._index += 1
            self._fields, self._a, self._b = [], [], []

    def hexdigest(self) -> str:
        n = len(self._header.pieces)
        if self._index != n or self._fields:
            raise CardError(f"{self._header.ref}: received {self._index} of {n} pieces (truncated transfer)")
        return header_digest(self._header)


class PieceJob:
    """A format-2 card's pieces hashed by helper threads while the caller does other work.

    BLAKE3 releases the GIL on big buffers, and each piece is three calls (framing, all A
    values, all B values), so helpers run beside Python work with no GIL waits to speak of.
    Pieces are shared out: up to `threads - 1` helpers take the next unhashed piece, and
    `result()` makes the caller take pieces too once its own work is done, so the whole card
    is hashed on every core with the GIL released. A one-piece card is hashed by one helper
    with BLAKE3's own threads (`max_threads`: one per core idle right now, a single one when
    unthreaded). Helpers start only on cores idle right now (`idle_cores`, unless `threads` is
    given). Unthreaded (small cards, one core, no idle core, or ``threaded=False``) it hashes
    in the constructor. `result()` raises CardError naming every piece that does not match,
    else returns the digest the header then has. Same interface as `DigestJob`.

    ``finite=True`` (`LoRACard.verify`): whoever hashes a piece also scans its values for
    NaN/Inf (`hash_scan`: chunk by chunk, each chunk scanned right after it is hashed, while
    it is in cache), so the value check is shared out over the same threads instead of
    running on the caller alone first; `result()` then raises the value error (naming the
    module) before any hash error, as `check_values()` followed by the digest would. There the
    caller, once no piece is left to take, waits for a piece still in progress only as long as
    its owner should need at the caller's pace, then hashes it again itself (a helper switched
    out mid-piece no longer holds up the answer); the first copy to end counts.
    """

    def __init__(
        self,
        header: CardHeader,
        runs: Sequence[BatchRun],
        *,
        threaded: bool | None = None,
        threads: int | None = None,
        finite: bool = False,
    ) -> None:
        check_layout(header, [len(r.names) for r in runs])
        self._runs = runs
        self._finite = finite
        self._nonfinite: list[int] = []
        self._header = header
        self.nbytes = sum(r.flat_a.nbytes + r.flat_b.nbytes for r in runs)
        n = len(runs)
        cores = max(1, threads if threads is not None else CPUS)
        # threaded=False: this thread only (no helper, no BLAKE3 threads), no /proc/loadavg read
        idle = 0 if threaded is False else cores - 1 if threads is not None else idle_cores()
        helpers = min(idle, n)
        # one piece: BLAKE3's own threads, as many as there are cores to run them (a BLAKE3
        # thread waiting for a busy core stalls the whole hash); else one piece per thread
        self._mt = min(cores, 1 + idle) if n == 1 else 1
        self._bad: list[int] = []
        self._error: BaseException | None = None
        self._cancelled = False
        self._next = itertools.count()  # next() is atomic under the GIL: each piece taken once
        self._count_lock = threading.Lock()
        self._hashed = 0
        self._won = [False] * n  # piece i's outcome recorded (by the first thread to hash it)
        self._chunked = finite and self._mt == 1  # verify: hash_scan, chunk by chunk
        self._progress = [0] * n  # chunks its owner has hashed, for a waiting thread to judge
        self._chunks = [scan_chunks(r.flat_a, r.flat_b) for r in runs] if self._chunked else []
        self._done = threading.Event()
        if threaded is None:
            threaded = self.nbytes >= 256 << 10 and cores > 1 and helpers > 0
        self._threaded = bool(threaded)
        if not self._threaded:
            self._work()
            return
        for k in range(max(1, helpers)):
            started = _thread.allocate_lock()
            started.acquire()
            on_helper(self._helper, started)
            if k == 0 and not self._finite:
                # hand the GIL over until the first helper hashes, briefly: on a loaded machine
                # the helper may not be scheduled for milliseconds, and the caller's own work
                # (numpy scans, copies) releases the GIL anyway. With finite=True (verify) the
                # caller's work is hashing too: it starts at once and releases the GIL each chunk.
                started.acquire(timeout=0.001)

    def _helper(self, started: Any) -> None:
        started.release()
        try:
            self._work()
        except BaseException as e:  # handed to the caller by result()
            self._error = e
            self._done.set()

    def _work(self) -> int:
        """Hash pieces until none is left (any thread may call it); the chunks this call hashed."""
        runs, pieces, dt = self._runs, self._header.pieces, self._header.dtype
        n = len(runs)
        chunks = 0
        while not self._cancelled:
            i = next(self._next)
            if i >= n:
                break
            run = runs[i]  # the framing is built by the thread that hashes the piece
            prefix, a, b = _run_parts(i, pieces[i][0], dt, run)
            if self._chunked:  # hashed and scanned chunk by chunk, in cache
                got = hash_scan(prefix, run.flat_a, run.flat_b, dt, functools.partial(self._owner_goes_on, i))
                if got is not None:
                    self._record(i, *got)
                    chunks += self._chunks[i]
            else:
                finite = not self._finite or (all_finite(run.flat_a, dt) and all_finite(run.flat_b, dt))
                self._record(i, hash_parts(prefix, a, b, self._mt), finite)
        return chunks

    def _owner_goes_on(self, i: int, done: int) -> bool:
        self._progress[i] = done  # what a waiting thread judges the owner's speed by
        return not self._won[i] and not self._cancelled

    def _record(self, i: int, got: str, finite: bool) -> None:
        """Piece `i`'s outcome, from whichever thread hashed it first."""
        with self._count_lock:
            if self._won[i]:
                return
            self._won[i] = True
            if got != self._header.pieces[i][2]:
                self._bad.append(i)
            if not finite:
                self._nonfinite.append(i)
            self._hashed += 1
            if self._hashed == len(self._runs):
                self._done.set()

    def _take_over(self, started: float, own_chunks: int) -> None:
        """The caller, with no piece left to take, waits for the pieces in progress only as
        long as their owners should need at the caller's own pace (chunks left x its time per
        chunk, twice over); a piece still unfinished then is hashed again by the caller, and
        whichever copy ends first counts (the other stops at its next chunk). On a machine
        shared with other work a helper is often switched out for a time slice (4 ms and
        more) in the middle of a piece; this bounds the wait to about one piece."""
        elapsed = time.perf_counter() - started
        chunk_s = elapsed / own_chunks if own_chunks else FINITE_CHUNK_BYTES / 1e9
        runs, pieces, dt = self._runs, self._header.pieces, self._header.dtype
        tried: set[int] = set()
        while not self._done.is_set() and not self._cancelled and self._error is None:
            late = [i for i in range(len(runs)) if not self._won[i] and i not in tried]
            if not late:
                return
            i = late[0]
            left = self._chunks[i] - self._progress[i]
            if self._done.wait(2 * left * chunk_s + 100e-6) or self._won[i]:
                continue
            tried.add(i)
            run = runs[i]
            prefix, _, _ = _run_parts(i, pieces[i][0], dt, run)
            got = hash_scan(prefix, run.flat_a, run.flat_b, dt, functools.partial(self._still_lost, i))
            if got is not None:
                self._record(i, *got)

    def _still_lost(self, i: int, _done: int) -> bool:
        """Should the caller go on hashing piece `i` (no helper's copy has won it yet)?"""
        return not self._won[i]

    def cancel(self) -> None:
        self._cancelled = True

    def result(self) -> str:
        if self._threaded and not self._cancelled and self._error is None:
            try:
                started = time.perf_counter()
                own = self._work()  # the caller's own work is done: it hashes what is left too
                digest = header_digest(self._header)  # while the helpers finish their last pieces
                if self._chunked:
                    self._take_over(started, own)
            except BaseException as e:
                self._error = e
                digest = ""
        else:
            digest = ""
        waited = self._error is None and not self._cancelled
        if waited and not self._done.wait(_HASH_TIMEOUT_S + self.nbytes / 100e6):
            raise CardError(f"hashing {self.nbytes} bytes did not finish in time; the machine is overloaded")
        if self._error is not None:
            raise CardError(f"hashing the card failed: {self._error}") from self._error
        if not self._done.is_set():
            raise CardError("the digest job was cancelled")
        if self._nonfinite:  # names the first module with a NaN or Inf
            first = min(self._nonfinite)
            check_finite([self._runs[i] for i in sorted(self._nonfinite)], self._header.dtype)
            raise CardError(  # the values changed under the scan (a file rewritten in place)
                f"{self._header.ref}: piece {first} of {len(self._runs)} has NaN or Inf values"
            )
        if self._bad:
            raise bad_piece_error(self._header, sorted(self._bad))
        return digest or header_digest(self._header)


__all__ = [
    "CARD2_DOMAIN",
    "CPUS",
    "PIECE_DOMAIN",
    "PieceJob",
    "PieceStream",
    "bad_piece_error",
    "check_layout",
    "content_digest",
    "hash_parts",
    "hash_scan",
    "header_digest",
    "idle_cores",
    "piece_hash",
    "piece_prefix",
    "pieces_of",
    "rows_piece_hash",
    "verify_piece",
]
