"""File I/O of a card: the FlatBuffers pre-check, the read-only mapping, preadv into buffers.

- `compressed_batch`: reads the IPC footer and each batch's message header (FlatBuffers) before
  Arrow touches a body, so a compressed batch is refused instead of inflated.
- `map_file` / `file_identity`: the whole file as a read-only mmap in an Arrow buffer, and the
  (device, inode, size, times) that tell whether it changed since.
- `preadv_all` / `writable_bytes`: `LoRACard.read_into`'s reads straight into destinations.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from loraflight.errors import CardError

from .header import DTYPES, MAX_ROWS

_IOV_MAX = 1024  # iovecs per preadv call (Linux's limit)


def preadv_all(fd: int, targets: list[memoryview], offset: int, path: Any) -> None:
    """Fill `targets` (in order) from the file at `offset`; short reads are resumed."""
    for i in range(0, len(targets), _IOV_MAX):
        bufs = targets[i : i + _IOV_MAX]
        want = sum(b.nbytes for b in bufs)
        done = 0
        for _ in range(want // 4096 + 2):  # each pass reads at least a byte or stops
            if done == want:
                break
            got = os.preadv(fd, _skip(bufs, done), offset + done)
            if got <= 0:
                break
            done += got
        if done != want:
            raise CardError(f"{path}: the file ended early while reading tensors (truncated since open?)")
        offset += want


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """`bufs` without their first `n` bytes."""
    if n == 0:
        return bufs
    out = []
    for b in bufs:
        if n >= b.nbytes:
            n -= b.nbytes
            continue
        out.append(b[n:])
        n = 0
    return out


def writable_bytes(obj: Any, shape: tuple[int, int], dtype: str, what: str) -> memoryview:
    """A writable byte view of a destination array/tensor, checked against shape and dtype."""
    if not isinstance(obj, np.ndarray):  # a torch tensor: torch is imported if one exists
        torch: Any = sys.modules.get("torch")
        if torch is None or not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            raise CardError(f"read_into: {what}: need a numpy array or a CPU torch tensor")
        if str(obj.dtype) != "torch." + dtype:
            raise CardError(f"read_into: {what}: dtype {obj.dtype}, the card holds {dtype}")
        if obj.requires_grad:
            obj = obj.detach()
        arr = obj.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else obj.numpy()
    else:
        arr = obj
        ok = (
            (arr.dtype.kind in "ui" and arr.dtype.itemsize == 2)
            if dtype == "bfloat16"
            else (arr.dtype == DTYPES[dtype])
        )
        if not ok:
            raise CardError(f"read_into: {what}: dtype {arr.dtype}, the card holds {dtype}")
    if tuple(arr.shape) != tuple(shape) or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise CardError(
            f"read_into: {what}: need a writable C-contiguous array of shape {tuple(shape)}, "
            f"got shape {tuple(arr.shape)}"
        )
    return arr.data.cast("B")


# --------------------------------------------------------------------------- IPC pre-check
# A compressed record batch makes Arrow allocate the uncompressed size its body claims before it
# decompresses (a few kB of zstd can claim gigabytes), so compression is refused by reading the
# footer and each batch's message header (FlatBuffers, format/File.fbs and Message.fbs) before
# Arrow touches a body. Anything this walk cannot parse is left to Arrow, which then reports it.

_FB_MAX_BATCHES = MAX_ROWS


def _fb_table(mv: memoryview, pos: int) -> tuple[int, int, int]:
    """(table position, vtable position, vtable size) of the table at `pos`."""
    vt = pos - struct.unpack_from("<i", mv, pos)[0]
    (vt_size,) = struct.unpack_from("<H", mv, vt)
    return pos, vt, vt_size


def _fb_field(mv: memoryview, table: tuple[int, int, int], index: int) -> int | None:
    """Position of field `index` of a table, or None when absent."""
    pos, vt, vt_size = table
    slot = 4 + 2 * index
    if slot + 2 > vt_size:
        return None
    (off,) = struct.unpack_from("<H", mv, vt + slot)
    return pos + off if off else None


def _fb_deref(mv: memoryview, pos: int) -> int:
    return pos + struct.unpack_from("<I", mv, pos)[0]


def compressed_batch(mv: memoryview) -> int | None:
    """Index of the first record batch whose message declares body compression, if any."""
    try:
        n = len(mv)
        (footer_len,) = struct.unpack_from("<i", mv, n - 10)
        start = n - 10 - footer_len
        if footer_len <= 0 or start < 8:
            return None
        footer = mv[start : n - 10]
        root = _fb_table(footer, _fb_deref(footer, 0))
        batches_at = _fb_field(footer, root, 3)  # Footer.recordBatches: [Block]
        if batches_at is None:
            return None
        vec = _fb_deref(footer, batches_at)
        (count,) = struct.unpack_from("<I", footer, vec)
        for i in range(min(count, _FB_MAX_BATCHES)):
            offset, meta_len, _pad, _body = struct.unpack_from("<qiiq", footer, vec + 4 + 24 * i)
            if offset < 0 or meta_len <= 0 or offset + meta_len > n:
                return None
            msg = mv[offset : offset + meta_len]
            head = 8 if struct.unpack_from("<I", msg, 0)[0] == 0xFFFFFFFF else 4
            fb = msg[head:]
            message = _fb_table(fb, _fb_deref(fb, 0))
            htype = _fb_field(fb, message, 1)  # Message.header_type
            header = _fb_field(fb, message, 2)  # Message.header
            if htype is None or header is None or fb[htype] != 3:  # 3 = RecordBatch
                continue
            batch = _fb_table(fb, _fb_deref(fb, header))
            if _fb_field(fb, batch, 3) is not None:  # RecordBatch.compression
                return i
    except (struct.error, IndexError, ValueError):
        return None
    return None


def map_file(p: Path) -> tuple[pa.Buffer, tuple[int, ...]]:
    """The whole file as a read-only memory map wrapped in an Arrow buffer (no copy).

    A Python mmap read through `pa.BufferReader` rather than `pa.memory_map`: Arrow's memory-mapped
    file advises the kernel on every read (madvise WILLNEED over each batch), which costs more than
    the rest of opening a card. The map lives as long as any array viewing it.
    """
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                raise CardError(f"{p}: not an Arrow IPC file or truncated: the file is empty")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CardError(f"{p}: no such card file") from None
    except (OSError, ValueError) as e:
        raise CardError(f"{p}: cannot map the file: {e}") from None
    return pa.py_buffer(mm), file_identity(st)


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


__all__ = ["compressed_batch", "file_identity", "map_file", "preadv_all", "writable_bytes"]
