"""Serving a bundle ticket (`cards:...`, docs/protocol.md "Catching up"): the files of several
cards as (digest, size, offset, data) rows, large pieces zero-copy from the mapped file."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from loraflight.engine.card.ipc import map_file
from loraflight.errors import CardError

from .pause import pause_point
from .protocol import BUNDLE_CHUNK_BYTES, bundle_schema
from .store import Store


def bundle_batches(store: Store, digests: list[str]) -> Iterator[pa.RecordBatch]:
    """The files of several cards as (digest, size, offset, data) pieces, in order; one
    transfer slot for the whole bundle. A card this node does not hold is one row of size -1.
    Large pieces go out zero-copy from the mapped file; small cards share a batch."""
    schema = bundle_schema()
    rows: list[tuple[str, int, int, pa.Buffer]] = []
    pending = 0
    sent = 0

    def batch() -> pa.RecordBatch:
        datas = [pa.Array.from_buffers(pa.binary(), 1, [None, _offsets(len(b)), b]) for _d, _s, _o, b in rows]
        data = datas[0] if len(datas) == 1 else pa.concat_arrays(datas)
        return pa.record_batch(
            [
                pa.array([r[0] for r in rows], pa.string()),
                pa.array([r[1] for r in rows], pa.int64()),
                pa.array([r[2] for r in rows], pa.int64()),
                data,
            ],
            schema=schema,
        )

    for digest in digests:
        buf = None
        if store.entry_exists(digest):
            try:
                # a plain mmap (Arrow's memory_map advises the kernel on every read)
                buf, _ident = map_file(store.path_of(digest))
            except CardError:
                buf = None  # removed meanwhile
        if buf is None:
            rows.append((digest, -1, 0, pa.py_buffer(b"")))
            continue
        store.touch(digest)
        size = buf.size
        for off in range(0, max(size, 1), BUNDLE_CHUNK_BYTES):
            piece = buf.slice(off, min(BUNDLE_CHUNK_BYTES, size - off))
            if rows and pending + piece.size > BUNDLE_CHUNK_BYTES:
                yield batch()
                rows, pending = [], 0
            rows.append((digest, size, off, piece))
            pending += piece.size
        sent += 1
        pause_point("serve_bundle_cards", sent)
    if rows:
        yield batch()


def _offsets(n: int) -> pa.Buffer:
    """The int32 offsets buffer of a one-value binary array of `n` bytes."""
    return pa.py_buffer((0).to_bytes(4, "little") + n.to_bytes(4, "little"))


__all__ = ["bundle_batches"]
