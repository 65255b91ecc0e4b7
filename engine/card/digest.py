"""The card digest: its byte stream (pure rule), incremental hashing, and the threaded job.

Format 1's digest (docs/format.md, "Digest") is sha256 over a domain tag, the canonical signed part of
the header, and each row's fields and tensor bytes in order. `digest_pieces`/`run_pieces` give
that stream as zero-copy pieces; `compute_digest` and `CardDigest` hash it in the caller's
thread; `DigestJob` is the one place a helper thread hashes it beside other work. Format 2
(BLAKE3 pieces) lives in `pieces`; `CardDigest` and `compute_digest` serve both formats.
"""

from __future__ import annotations

import _thread
import hashlib
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from loraflight.errors import CardError

from .batches import BatchRun, ModuleLoRA, batch_rows, contiguous
from .header import CardHeader, canonical_json, card_schema, schema_str
from .helpers import submit as on_helper
from .pieces import PieceStream, content_digest

PARALLEL_VERIFY_BYTES = 16 << 20  # from this size verify scans values and hashes in parallel


_DIGEST_DOMAIN = b"loraflight-card-v1\x00"


# --------------------------------------------------------------------------- digest


class CardDigest:
    """Incremental canonical digest: header first, then record batches in order.

    Lets a receiver hash a card while it arrives (docs/format.md, "Digest"). For a format-2
    header each piece is checked against the header's hash as soon as its rows are in (a bad
    piece raises CardError naming it) and `hexdigest()` is the header's BLAKE3 digest once all
    pieces have passed.
    """

    def __init__(self, header: CardHeader, num_rows: int) -> None:
        self._pieces = PieceStream(header, num_rows) if header.major >= 2 else None
        self._h = hashlib.sha256(_DIGEST_DOMAIN)
        head = canonical_json(header.signed_part())
        self._h.update(struct.pack("<Q", len(head)))
        self._h.update(head)
        self._h.update(struct.pack("<Q", num_rows))
        self._dtype = header.dtype.encode()
        self._schema: pa.Schema | None = None

    def update_row(self, module: str, rank: int, alpha: float, fin: int, fout: int, a: Any, b: Any) -> None:
        if self._pieces is not None:
            self._pieces.update_row(module, rank, alpha, fin, fout, a, b)
            return
        h = self._h
        name = module.encode()
        h.update(struct.pack("<I", len(name)))
        h.update(name)
        h.update(struct.pack("<IdQQ", rank, alpha, fin, fout))
        h.update(struct.pack("<B", len(self._dtype)))
        h.update(self._dtype)
        for t in (a, b):
            mv = memoryview(t).cast("B")
            h.update(struct.pack("<Q", mv.nbytes))
            h.update(mv)

    def update_batch(self, batch: pa.RecordBatch) -> None:
        """Check one received batch (schema, structure) and hash its rows."""
        if self._schema is None:
            self._schema = card_schema(self._dtype.decode())
        if not batch.schema.equals(self._schema, check_metadata=False):
            raise CardError(
                f"record batch has schema ({schema_str(batch.schema)}), expected ({schema_str(self._schema)})"
            )
        for m in batch_rows(batch, self._dtype.decode()):
            self.update_row(
                m.module, m.rank, m.alpha, m.in_features, m.out_features, contiguous(m.a), contiguous(m.b)
            )

    def hexdigest(self) -> str:
        if self._pieces is not None:
            return self._pieces.hexdigest()
        return self._h.hexdigest()


def compute_digest(header: CardHeader, modules: Sequence[ModuleLoRA]) -> str:
    """The digest `modules` give under `header` (format 2: pieces over the header's row ranges)."""
    if header.major >= 2:
        return content_digest(header, modules)
    h = hashlib.sha256()
    for piece in digest_pieces(header, modules)[0]:
        h.update(piece)
    return h.hexdigest()


def digest_pieces(header: CardHeader, modules: Sequence[ModuleLoRA]) -> tuple[list[Any], int]:
    """The digest's byte stream (docs/format.md, "Digest") as pieces, and its length in bytes.

    Pieces alternate between small `bytes` (the framing: header, row fields, lengths) and
    zero-copy byte views of each row's A and B, so the stream is hashed (or gathered) without
    copying a tensor.
    """
    rows = (
        (
            m.module,
            m.rank,
            m.alpha,
            m.in_features,
            m.out_features,
            contiguous(m.a).data.cast("B"),
            contiguous(m.b).data.cast("B"),
        )
        for m in modules
    )
    return _stream_pieces(header, len(modules), rows)


def run_pieces(header: CardHeader, runs: Sequence[BatchRun]) -> tuple[list[Any], int]:
    """`digest_pieces` from a card's batch runs: byte slices of each batch's flat arrays."""

    def rows() -> Iterator[tuple[str, int, float, int, int, memoryview, memoryview]]:
        for run in runs:
            mva = contiguous(run.flat_a).data.cast("B")
            mvb = contiguous(run.flat_b).data.cast("B")
            isz = run.flat_a.itemsize
            oa, ob = run.oa, run.ob
            for i, name in enumerate(run.names):
                a = mva[oa[i] * isz : oa[i + 1] * isz]
                b = mvb[ob[i] * isz : ob[i + 1] * isz]
                yield name, run.ranks[i], run.alphas[i], run.fins[i], run.fouts[i], a, b

    return _stream_pieces(header, sum(len(r.names) for r in runs), rows())


def _stream_pieces(
    header: CardHeader, n: int, rows: Iterable[tuple[str, int, float, int, int, memoryview, memoryview]]
) -> tuple[list[Any], int]:
    """The one framing of the digest stream over (name, rank, alpha, in, out, A bytes, B bytes)."""
    head = canonical_json(header.signed_part())
    dt = header.dtype.encode()
    pre: list[bytes] = [_DIGEST_DOMAIN, struct.pack("<Q", len(head)), head, struct.pack("<Q", n)]
    pieces: list[Any] = []
    total = 0
    pack_row = struct.Struct("<IdQQB").pack
    pack_u32 = struct.Struct("<I").pack
    pack_u64 = struct.Struct("<Q").pack
    for name, rank, alpha, fin, fout, a, b in rows:
        nb = name.encode()
        pre += (pack_u32(len(nb)), nb, pack_row(rank, alpha, fin, fout, len(dt)), dt, pack_u64(a.nbytes))
        small = b"".join(pre)
        mid = pack_u64(b.nbytes)
        pieces += (small, a, mid, b)
        total += len(small) + a.nbytes + len(mid) + b.nbytes
        pre = []
    if pre:  # a card without rows (never valid, but hashable)
        small = b"".join(pre)
        pieces.append(small)
        total += len(small)
    return pieces, total


_THREAD_HASH_BYTES = 256 << 10  # from this size DigestJob hashes in a helper thread
GATHER_BYTES = 8 << 20  # default: the first 8 MiB of the stream are gathered for a GIL-free start
_HASH_TIMEOUT_S = 60.0  # plus 1 s per 100 MB: a bound on waiting for the helper, never reached


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_CPUS = _cpus()


def _spare_core() -> bool:
    """Whether a helper thread would find a core of its own right now.

    Linux's /proc/loadavg counts the tasks running or runnable at this instant (this thread
    included). When every core is taken, a helper only adds two context switches and a
    wake-up delay, so the caller hashes inline instead.
    """
    if _CPUS < 2:
        return False
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running < _CPUS


class DigestJob:
    """A card's digest, computed in a helper thread while the caller does other work.

    Theory: hashlib releases the GIL while it hashes a buffer of 2 KiB or more, so sha256
    runs on another core beside Python work. But a helper that hashes tensor by tensor must
    re-take the GIL after each call, and while the calling thread runs Python that wait lasts
    up to the interpreter's switch interval (5 ms) *per call*. So the caller first gathers the
    start of the stream (`gather` bytes, 8 MiB by default: all of a typical card) into one
    contiguous buffer, a memcpy at a fraction of the hash's cost, and the helper hashes it in
    one call that never needs the GIL; the rest of a bigger stream is hashed piece by piece
    (its GIL waits are bounded by the caller's Python time, small against such a hash). A
    caller that only runs GIL-light numpy work meanwhile (`LoRACard.verify`) passes
    ``gather=0``: the helper starts hashing at once.

    Small streams (below 256 KiB), a single core, or no idle core at this moment (every core
    running something, by /proc/loadavg): hashed right here, in the constructor.
    `result()` waits (bounded) and returns the hex digest; `cancel()` stops a job whose result
    is no longer wanted (between pieces).
    """

    def __init__(
        self,
        header: CardHeader,
        modules: Sequence[ModuleLoRA],
        *,
        threaded: bool | None = None,
        gather: int = GATHER_BYTES,
        pieces: tuple[list[Any], int] | None = None,
    ) -> None:
        pieces_, total = digest_pieces(header, modules) if pieces is None else pieces
        pieces = None
        self.nbytes = total
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._threaded = False
        if threaded is None:
            threaded = total >= _THREAD_HASH_BYTES and _spare_core()
        if not threaded:
            h = hashlib.sha256()
            for piece in pieces_:
                h.update(piece)
            self._digest = h.hexdigest()
            return
        k, size = 0, 0
        while k < len(pieces_) and size < gather:
            piece = pieces_[k]
            size += len(piece) if isinstance(piece, bytes) else piece.nbytes
            k += 1
        first = b"".join(pieces_[:k]) if k > 1 else (pieces_[0] if k else b"")
        # A kept helper thread (`helpers`): no thread start per job, and no wait for a new
        # thread to be scheduled (threading.Thread.start() blocks until it is); the helper
        # starts hashing as soon as it is woken and this thread next releases the GIL.
        self._done = threading.Event()
        started = _thread.allocate_lock()
        started.acquire()
        on_helper(self._run, first, pieces_[k:], started)
        self._threaded = True
        # Hand the GIL over: wait (GIL released) until the helper is inside its first hash call.
        # Else it waits for this thread to release the GIL long enough, which Python code does
        # only every few calls (or after the 5 ms switch interval). Bounded; the helper's
        # scheduling delay is all it costs, and this thread's work is shorter than the hash.
        started.acquire(timeout=0.005)

    def _run(self, first: Any, rest: list[Any], started: Any) -> None:
        try:
            h = hashlib.sha256()
            started.release()  # the caller may go on: this thread holds the GIL until update()
            h.update(first)  # one call: the GIL stays released for the whole buffer
            for piece in rest:
                if self._cancelled:
                    return
                h.update(piece)
            self._digest = h.hexdigest()
        except BaseException as e:  # handed to the caller by result()
            self._error = e
        finally:
            self._done.set()

    def cancel(self) -> None:
        self._cancelled = True

    def result(self) -> str:
        """The hex digest (waits for the helper, bounded by a generous timeout)."""
        if self._threaded and not self._done.wait(_HASH_TIMEOUT_S + self.nbytes / 100e6):
            raise CardError(f"hashing {self.nbytes} bytes did not finish in time; the machine is overloaded")
        if self._error is not None:
            raise CardError(f"hashing the card failed: {self._error}") from self._error
        if self._digest is None:
            raise CardError("the digest job was cancelled")
        return self._digest


__all__ = [
    "GATHER_BYTES",
    "PARALLEL_VERIFY_BYTES",
    "CardDigest",
    "DigestJob",
    "compute_digest",
    "digest_pieces",
    "run_pieces",
]
