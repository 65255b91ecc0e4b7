"""The cross-request batcher: admitted inputs of many requests share one forward.

Theory of operation
-------------------
A `Job` is one admitted request: its rows (token ids and the engine row name each runs on)
and a future for its (n, dim) result. `submit` admits a job when the rows waiting plus its
own fit in ``queue`` (else `BusyError`: the API answers 429 with Retry-After). One worker
thread takes the oldest job's rows first: it waits up to ``max_wait`` for more rows once the
first is there, then runs up to ``max_batch`` rows, from as many jobs as fit, in *one*
forward (`run_batch`, the engine's mixed rows), and hands each job its slice. A job larger
than ``max_batch`` runs over several forwards. A job whose client went away (``cancelled()``)
is dropped before its remaining rows run. `before_forward` is a hook the tests use as a gate.
`stop()` finishes what was admitted (bounded) and fails the rest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from loraflight.errors import BusyError, EngineError

log = logging.getLogger(__name__)

RunBatch = Callable[[list[Sequence[int]], list[str | None]], np.ndarray]


@dataclasses.dataclass(eq=False)
class Job:
    """One admitted request."""

    ids: list[Sequence[int]]
    rows: list[str | None]  # engine row name per input (None: base)
    cancelled: Callable[[], bool] = lambda: False
    future: concurrent.futures.Future[np.ndarray] = dataclasses.field(
        default_factory=concurrent.futures.Future
    )
    labels: Sequence[str] = ()  # per input, for metrics (adapter name or the base id)
    done_rows: int = 0
    parts: list[np.ndarray] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.rows):
            raise ValueError("a job needs one row name per input")

    @property
    def left(self) -> int:
        return len(self.ids) - self.done_rows


class Batcher:
    """See the module doc."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        queue: int = 1024,
        on_batch: Callable[[int, list[Job]], None] | None = None,
        name: str = "loraflight-batcher",
    ) -> None:
        if max_batch < 1 or queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and queue must be positive and max_wait_s not negative")
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.queue = max_batch, max_wait_s, queue
        self.on_batch = on_batch
        self.before_forward: Callable[[list[Job]], None] | None = None  # test gate
        self._jobs: collections.deque[Job] = collections.deque()
        self._waiting = 0  # rows admitted and not yet run
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        with self._cv:
            return self._waiting

    def submit(self, job: Job, *, wait_s: float = 0.0) -> concurrent.futures.Future[np.ndarray]:
        """Admit `job` (waiting up to `wait_s` for room), or raise BusyError when the queue is full."""
        n = len(job.ids)
        if n == 0:
            job.future.set_result(np.zeros((0, 0), np.float32))
            return job.future
        if n > self.queue:
            raise BusyError(f"a request of {n} inputs can never fit the queue of {self.queue} (api.queue)")
        deadline = time.monotonic() + wait_s
        with self._cv:
            while self._waiting + n > self.queue and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BusyError(
                        f"{self._waiting} inputs are queued and the limit is {self.queue} (api.queue); retry"
                    )
                self._cv.wait(left)
            if self._stopping:
                raise BusyError("the API is shutting down")
            self._jobs.append(job)
            self._waiting += n
            self._cv.notify_all()
        return job.future

    def _take(self) -> tuple[list[Job], list[tuple[Job, int, int]]] | None:
        """The next batch: (jobs, [(job, start, stop)]) or None when stopping and empty."""
        with self._cv:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cv.wait()
            deadline = time.monotonic() + self.max_wait_s
            while self._waiting < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            spans: list[tuple[Job, int, int]] = []
            dropped: list[Job] = []
            room = self.max_batch
            while self._jobs and room:
                job = self._jobs[0]
                if job.cancelled() or job.future.done():  # the client went away: drop it here,
                    self._jobs.popleft()  # where none of its rows is in a forward
                    self._waiting -= job.left
                    dropped.append(job)
                    continue
                k = min(room, job.left)
                spans.append((job, job.done_rows, job.done_rows + k))
                job.done_rows += k
                room -= k
                self._waiting -= k
                if job.left == 0:
                    self._jobs.popleft()
            self._cv.notify_all()
        for job in dropped:  # outside the lock: cancelling ends the job's lease
            job.future.cancel()
        return list(dict.fromkeys(j for j, _, _ in spans)), spans

    def _loop(self) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            jobs, spans = got
            if not spans:
                continue
            ids = [x for j, a, b in spans for x in j.ids[a:b]]
            rows = [x for j, a, b in spans for x in j.rows[a:b]]
            try:
                if self.before_forward is not None:
                    self.before_forward(jobs)
                out = self.run_batch(ids, rows)
            except BaseException as e:  # the engine refused: every job in the batch fails
                log.warning("a batch of %d rows failed: %s", len(ids), e)
                err = e if isinstance(e, Exception) else EngineError(str(e))
                for j in jobs:
                    self._fail(j, err)
                continue
            if self.on_batch is not None:
                try:
                    self.on_batch(len(ids), jobs)
                except Exception:
                    log.exception("batch metrics failed")
            i = 0
            for j, a, b in spans:
                j.parts.append(out[i : i + (b - a)])
                i += b - a
                if j.done_rows == len(j.ids) and not j.future.done():
                    j.future.set_result(np.concatenate(j.parts) if len(j.parts) > 1 else j.parts[0])

    def _fail(self, job: Job, err: Exception) -> None:
        with self._cv:
            if job.left and job in self._jobs:
                self._jobs.remove(job)
                self._waiting -= job.left
        if not job.future.done():
            job.future.set_exception(err)

    def stop(self, timeout: float = 10.0) -> None:
        """Run what was admitted (up to `timeout`), then fail anything left; joins the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:
            left = list(self._jobs)
            self._jobs.clear()
            self._waiting = 0
        for j in left:
            if not j.future.done():
                j.future.set_exception(BusyError("the API stopped before this request ran"))


__all__ = ["Batcher", "Job", "RunBatch"]
