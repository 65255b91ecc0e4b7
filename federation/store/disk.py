"""The store's disk: errors that say what to do, kernel writeback hints, group-committed
directory fsyncs.

Nothing here knows about cards: `disk_error` turns an `OSError` into a `StoreError`,
`start_writeback` asks Linux to start writing a file range now, `DirSync` lets concurrent
committers share one fsync of a directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from typing import Any

from loraflight.errors import StoreError
from loraflight.files import fsync_dir

_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_sync_file_range: Any = None  # resolved on first use; False where unavailable


def is_enospc(e: OSError) -> bool:
    """The disk (or the quota) is full."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_error(e: OSError, what: str) -> StoreError:
    """`e` as a StoreError saying what failed and, for a full disk, what to do."""
    if is_enospc(e):
        return StoreError(f"{what}: the disk is full ({e.strerror}); free space or raise the store's quota")
    return StoreError(f"{what}: {e.strerror or e}")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of a file to disk now (Linux
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


class DirSync:
    """fsync one directory so renames made before `sync()` survive a crash (group commit).

    Concurrent committers share one fsync: a caller whose rename is covered by an fsync
    that *started* after its rename returns when that fsync ends, instead of queueing its
    own. Bounded: each round either runs an fsync or waits for the one in flight.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._ticket = 0
        self._synced = 0
        self._syncing = False

    def sync(self) -> None:
        with self._cond:
            self._ticket += 1
            mine = self._ticket
            for _ in range(10_000):
                if self._synced >= mine:
                    return
                if not self._syncing:
                    self._syncing = True
                    covers = self._ticket  # every rename that took a ticket so far
                    break
                self._cond.wait(5.0)
            else:
                covers = mine  # pathological contention: sync on our own below
                self._syncing = True
        done = False
        try:
            fsync_dir(self.path)
            done = True
        finally:
            with self._cond:
                self._syncing = False
                if done:
                    self._synced = max(self._synced, covers)
                self._cond.notify_all()


__all__ = ["DirSync", "disk_error", "is_enospc", "start_writeback"]
