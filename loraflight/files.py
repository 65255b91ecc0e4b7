"""Durable file replacement: the one home of `os.replace` for everything loraflight writes.

A file (card, key, status, PEFT config) or a folder (an exported PEFT adapter) is built
beside its final name and renamed into place, so a reader sees the old one or the new
one whole, never half of either; `durable=True` also fsyncs the data and the directory,
so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Body = bytes | Callable[[BinaryIO], None]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create inside `path` durable (no-op where directories can't be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, durable: bool = True) -> Path:
    """Rename `src` (a file or a folder) over `dst` atomically; fsync `dst`'s directory if durable."""
    dst = Path(dst)
    os.replace(src, dst)
    if durable:
        fsync_dir(dst.parent)
    return dst


def atomic_write(
    path: str | os.PathLike[str],
    body: Body,
    *,
    mode: int | None = None,
    durable: bool = True,
    suffix: str = "",
) -> Path:
    """Write `body` (bytes, or a function writing to a binary file) to `path` all at once.

    The temp file lives in the same directory (created 0600 by mkstemp; `mode` sets the
    final permission bits before the rename) and is removed if anything fails.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(body, bytes | bytearray | memoryview):
                f.write(body)
            else:
                body(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        replace(tmp, p, durable=durable)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


__all__ = ["atomic_write", "fsync_dir", "replace"]
