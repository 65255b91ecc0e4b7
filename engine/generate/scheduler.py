"""`GenerationScheduler`: one thread that decodes every running request together.

Theory of operation
-------------------
Requests wait in a bounded queue (`max_waiting`; a full queue refuses with `BusyError`).
The scheduler thread loops over *steps*. Between two steps it drops cancelled requests
(their cache is freed at once), admits waiting ones while fewer than `max_batch` run, and
runs each newcomer's prefill as its own forward (one request, its whole prompt) and samples
its first token. A step then feeds every running request its pending token in ONE forward
(`Runner.decode`): row i uses request i's adapter (engine mixed rows), caches left-padded,
each row masked to its own keys and given its own positions (see `batch`), so every row
computes what it would alone. Each row's logits give its next token (`sampling`), its text
delta (`text`), and maybe its end: EOS or a stop string ("stop"), `max_tokens` or the
context ("length"). A finished request leaves before the next step and its handle gets the
result; `release` (e.g. an adapter lease) is called once, whatever the end.

A step whose batched forward fails (say an adapter went away) is retried row by row, so
only the requests that fail alone fail; the rest go on. Nothing here waits on a reader:
deltas are buffered in the handle (bounded by max_tokens), and the listener (`notify`)
is only called.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from loraflight.errors import BusyError, EngineError

from .batch import pack
from .runner import Runner
from .sampling import SamplingParams, choose_token
from .state import GenerationHandle, RequestState, check_context

log = logging.getLogger(__name__)

_IDLE_WAIT = 0.5  # s: how long the idle thread sleeps before looking at `closed` again


class GenerationScheduler:
    """Continuous batching of generation requests over one causal LM (see module docstring)."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        *,
        max_context: int,
        eos_token_ids: Sequence[int] = (),
        max_batch: int = 8,
        max_waiting: int = 64,
        on_change: Callable[[int, int], None] | None = None,
        name: str = "loraflight-generate",
        tokenizer_lock: Any = None,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise EngineError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise EngineError(f"max_waiting must be a non-negative integer, got {max_waiting!r}")
        if not isinstance(max_context, int) or max_context < 2:
            raise EngineError(f"max_context must be an integer of at least 2, got {max_context!r}")
        self.runner = runner
        self.tokenizer = tokenizer
        # held around every tokenizer call of this thread (share it with whoever else encodes)
        self.tokenizer_lock = tokenizer_lock if tokenizer_lock is not None else threading.Lock()
        self.max_context = max_context
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.on_change = on_change
        self.steps = 0  # decode forwards run (each serves every running request)
        self.step_rows: collections.Counter[int] = collections.Counter()  # batch size -> decode steps
        self._held = 0
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._active: list[RequestState] = []
        self._n_active = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def for_engine(cls, engine: Any, lm: Any, **kwargs: Any) -> GenerationScheduler:
        """A scheduler over `engine` (mixed rows by adapter name) for a loaded `models.CausalLM`."""
        kwargs.setdefault("max_context", lm.max_context)
        kwargs.setdefault("eos_token_ids", lm.eos_token_ids)
        kwargs.setdefault("tokenizer_lock", lm.lock)
        return cls(Runner.for_engine(engine), lm.tokenizer, **kwargs)

    # ------------------------------------------------------------------ the callers' side
    def __enter__(self) -> GenerationScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Requests in the batch now (prefilled or decoding)."""
        with self._cond:
            return self._n_active

    @property
    def waiting(self) -> int:
        """Requests queued for a batch slot."""
        with self._cond:
            return len(self._waiting)

    def check(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why such a request would not fit the context (None: it fits); see `state.check_context`."""
        return check_context(prompt_tokens, max_tokens, self.max_context)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        adapter: str | None = None,
        *,
        detok_context: Sequence[int] = (),
        notify: Callable[[GenerationHandle], None] | None = None,
        release: Callable[[], None] | None = None,
    ) -> GenerationHandle:
        """Queue a request; its handle streams the text and gives the result.

        `adapter`: the engine adapter name its rows use (None: the base). `detok_context`: ids
        the text continues (a completion's prompt: its first word gets its leading space).
        `notify(handle)` is called from the scheduler thread after each delta and at the end
        (keep it short); `release()` once when the request leaves, whatever the end.
        """
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = [int(i) for i in prompt_ids]
        problem = self.check(len(ids), params.max_tokens)
        if problem is not None:
            raise EngineError(problem)
        handle = GenerationHandle(adapter, len(ids), params, notify=notify, wake=self._wake)
        st = RequestState.new(
            handle,
            ids,
            self.tokenizer,
            detok_context=detok_context,
            release=release,
            device=self.runner.device,
            tokenizer_lock=self.tokenizer_lock,
        )
        with self._cond:
            if self._closed:
                raise EngineError("the generation scheduler is closed")
            if len(self._waiting) >= self.max_waiting + max(0, self.max_batch - self._n_active):
                raise BusyError(
                    f"generation queue is full ({self.max_waiting} waiting, {self.max_batch} running); retry later"
                )
            self._waiting.append(st)
            self._cond.notify_all()
        self._changed()
        return handle

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Within this block nothing new joins the batch (running requests go on): submit
        several requests here and they join together at the next step boundary."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (bounded wait); requests still queued or running fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("generation thread did not stop within %.0f s", timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _changed(self) -> None:
        if self.on_change is None:
            return
        with self._cond:
            a, w = self._n_active, len(self._waiting)
        try:
            self.on_change(a, w)
        except Exception:
            log.exception("generation on_change listener failed")

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        try:
            while True:
                joiners = self._admit()
                if joiners is None:
                    break
                for st in joiners:
                    self._prefill(st)
                self._reap()
                live = [s for s in self._active if not s.finished]
                if live:
                    self._step(live)
                self._reap()
        except BaseException as e:  # a bug here must not leave callers waiting for ever
            log.exception("generation thread failed")
            self._fail_all(EngineError(f"the generation thread failed: {e}"))
            raise
        self._fail_all(EngineError("the generation scheduler was closed"))

    def _admit(self) -> list[RequestState] | None:
        """Cancelled requests out, waiting ones in (up to max_batch); None once closed."""
        with self._cond:
            while not self._closed and not self._active and (not self._waiting or self._held):
                self._cond.wait(_IDLE_WAIT)
            if self._closed:
                return None
            dropped = [s for s in self._waiting if s.handle.cancel_requested]
            for st in dropped:
                self._waiting.remove(st)
                st.finish_reason = "cancelled"
            joiners: list[RequestState] = []
            while not self._held and self._waiting and len(self._active) + len(joiners) < self.max_batch:
                joiners.append(self._waiting.popleft())
            self._active.extend(joiners)
            self._n_active = len(self._active)
        for st in dropped:  # outside the lock: leaving calls the caller's listener and release
            st.leave()
        if joiners or dropped:
            self._changed()
        return joiners

    def _reap(self) -> None:
        """Requests that finished or were cancelled leave the batch now."""
        gone = []
        for st in self._active:
            if not st.finished and st.handle.cancel_requested:
                st.finish_reason = "cancelled"
            if st.finished:
                gone.append(st)
        if not gone:
            return
        with self._cond:
            self._active = [s for s in self._active if not s.finished]
            self._n_active = len(self._active)
        for st in gone:
            if not st.handle.done:
                st.leave()
        self._changed()

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            everyone = [*self._active, *self._waiting]
            self._active, self._n_active = [], 0
            self._waiting.clear()
        for st in everyone:
            if not st.handle.done:
                st.leave(error)
        if everyone:
            self._changed()

    def _prefill(self, st: RequestState) -> None:
        if st.handle.cancel_requested:
            st.finish_reason = "cancelled"
            return
        try:
            logits, kv = self.runner.prefill(st.adapter, st.prompt_ids)
        except Exception as e:
            self._fail(st, e)
            return
        st.kv = kv
        self._advance_or_fail(st, logits)

    def _step(self, live: list[RequestState]) -> None:
        try:
            packed = pack([s.kv for s in live], [s.pending for s in live])  # type: ignore[misc]
            logits, caches = self.runner.decode([s.adapter for s in live], packed)
        except Exception as e:
            if len(live) == 1:
                self._fail(live[0], e)
                return
            log.warning("batched decode step failed (%s); retrying its %d rows one by one", e, len(live))
            for s in live:
                self._step([s])
            return
        self.steps += 1
        self.step_rows[len(live)] += 1
        for i, s in enumerate(live):
            s.kv = caches[i]
            self._advance_or_fail(s, logits[i])

    def _fail(self, st: RequestState, error: Exception) -> None:
        log.warning("generation request %d (adapter %r) failed: %s", st.handle.id, st.adapter, error)
        st.finish_reason = "stop"
        st.leave(error if isinstance(error, EngineError) else EngineError(f"generation failed: {error}"))

    def _advance_or_fail(self, st: RequestState, logits: torch.Tensor) -> None:
        try:
            self._advance(st, logits)
        except Exception as e:  # one request's failure (say its tokenizer) is not the others'
            self._fail(st, e)

    def _advance(self, st: RequestState, logits: torch.Tensor) -> None:
        """Sample the next token from `logits` (V,) and move the request on (or end it)."""
        tok, lp = choose_token(logits, st.params, st.generator)
        st.generated.append(tok)
        st.logprobs.append(lp)
        if tok in self.eos_token_ids:
            self._end(st, "stop", flush=True)
            return
        out = st.text.add(st.detok.push(tok))
        st.handle.put_text(out)
        if st.text.stopped:
            self._end(st, "stop", flush=False)
        elif (
            len(st.generated) >= st.params.max_tokens
            or len(st.prompt_ids) + len(st.generated) >= self.max_context
        ):
            self._end(st, "length", flush=True)
        else:
            st.pending = tok

    def _end(self, st: RequestState, reason: str, *, flush: bool) -> None:
        if flush:
            st.handle.put_text(st.text.add(st.detok.flush()))
            if st.text.stopped:
                reason = "stop"
            st.handle.put_text(st.text.finish())
        st.finish_reason = reason  # type: ignore[assignment]
        st.kv = None
        st.pending = None


__all__ = ["GenerationScheduler"]
