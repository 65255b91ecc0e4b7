"""Kept helper threads for hashing: a card's pieces go to threads that already exist.

A thread started for each job (`_thread.start_new_thread`) took, measured here, 0.13 ms from
start to running while the other core had been busy a moment before, and about 1 ms when the
process had been idle for 10 ms before (a node verifying a card that just arrived; the
verify benchmark runs right after a single-threaded competitor). A kept thread blocked on a
lock was running 20 to 80 µs after it was woken, in both cases. BLAKE3's own pool keeps its
threads the same way.

`submit(fn, *args)` runs `fn(*args)` on a kept thread: an idle one when there is one, else a
new one while fewer than `limit` exist, else after the running tasks (the jobs that submit
here also do the work on their own thread, so a queued task only means less parallelism,
never a wait). Tasks must be short, must not block, and must catch their own errors; an
error that escapes one is logged and the thread goes on. The threads are daemons and
never exit; a child made by `fork` starts with no threads and makes its own.
"""

from __future__ import annotations

import _thread
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("loraflight.card")

LIMIT = 2 * (os.cpu_count() or 1)  # kept threads at most; more tasks wait for one of them


class HelperPool:
    """Kept daemon threads running short tasks (see the module docstring)."""

    def __init__(self, limit: int = LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"a helper pool needs at least one thread, got limit={limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._tasks: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._waiting: list[Any] = []  # one lock per idle thread, held until it has a task
        self._threads = 0

    @property
    def threads(self) -> int:
        """How many kept threads exist now."""
        return self._threads

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        with self._lock:
            self._tasks.append((fn, args))
            if self._waiting:
                self._waiting.pop().release()  # wake one idle thread
                return
            if self._threads >= self.limit:
                return  # the next thread to finish its task takes it
            self._threads += 1
        try:
            _thread.start_new_thread(self._serve, ())
        except RuntimeError:  # no thread could be made: the tasks wait for the kept ones
            with self._lock:
                self._threads -= 1
            log.warning("could not start a hashing helper thread; hashing goes on with fewer")

    def _serve(self) -> None:
        wake = _thread.allocate_lock()
        while True:
            with self._lock:
                task = self._tasks.popleft() if self._tasks else None
                if task is None:
                    wake.acquire()  # held: released by submit() when a task is queued
                    self._waiting.append(wake)
            if task is None:
                wake.acquire()  # sleeps until submit() releases it
                wake.release()
                continue
            fn, args = task
            try:
                fn(*args)
            except BaseException:  # a task catches its own errors; this keeps the thread alive
                log.exception("a hashing helper task failed")
            del task, fn, args

    def _forget(self) -> None:
        """After fork(): the child has none of the parent's threads."""
        self._lock = threading.Lock()
        self._tasks.clear()
        self._waiting = []
        self._threads = 0


POOL = HelperPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL._forget)


def submit(fn: Callable[..., object], *args: Any) -> None:
    """Run `fn(*args)` on one of the process's kept helper threads (`POOL`)."""
    POOL.submit(fn, *args)


__all__ = ["LIMIT", "POOL", "HelperPool", "submit"]
