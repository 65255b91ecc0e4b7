"""One generation request: its handle (what the caller holds) and its state (what the scheduler drives).

A `GenerationHandle` is thread-safe: the scheduler thread appends text deltas and, once,
the outcome; any thread reads them (`poll` without blocking, `stream` and `result` with
bounded waits), and `cancel` asks the scheduler to drop the request before its next step.
The buffered deltas are bounded by the request's `max_tokens` (at most one per token, plus
one at the end), so a slow reader never makes the scheduler wait.

`RequestState` is the scheduler's record of a running request: prompt and generated ids,
the per-step log-probabilities, its KV cache, its pending token (sampled, not yet fed),
its generator, detokenizer and stop-string state, and how it finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch

from .batch import KV
from .sampling import SamplingParams, make_generator
from .text import IncrementalDetokenizer, StopText

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]
_IDS = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """How a request ended: its text (the concatenated deltas), why, and its tokens."""

    text: str
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_tokens or the context;
    # "cancelled": the caller cancelled it (text: what was sent before)
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]  # generated ids, EOS included when it ended the request
    logprobs: tuple[float, ...]  # per generated token: the model's log-probability of it
    adapter: str | None


class GenerationHandle:
    """The caller's side of one request: text deltas as they come, then the result."""

    def __init__(
        self,
        adapter: str | None,
        prompt_tokens: int,
        params: SamplingParams,
        notify: Callable[[GenerationHandle], None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.id = next(_IDS)
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self.params = params
        self._notify = notify
        self._wake = wake
        self._cond = threading.Condition()
        self._deltas: list[str] = []
        self._read = 0
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._done = False
        self.cancel_requested = False

    def __repr__(self) -> str:
        return f"GenerationHandle(id={self.id}, adapter={self.adapter!r}, done={self._done})"

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Ask the scheduler to drop this request before its next step (no effect once done)."""
        self.cancel_requested = True
        if self._wake is not None:
            self._wake()

    def poll(self) -> tuple[list[str], bool]:
        """(deltas not yet taken, whether the request is over) without waiting."""
        with self._cond:
            out = self._deltas[self._read :]
            self._read = len(self._deltas)
            return out, self._done

    def stream(self, timeout: float | None = 60.0) -> Iterator[str]:
        """Text deltas as they come, until the request ends (`timeout`: the longest wait for one)."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._read < len(self._deltas) or self._done, timeout):
                    raise TimeoutError(f"no text from request {self.id} within {timeout} s")
                out = self._deltas[self._read :]
                self._read = len(self._deltas)
                done = self._done
            yield from out
            if done:
                with self._cond:
                    rest = self._deltas[self._read :]
                    self._read = len(self._deltas)
                yield from rest
                if self._error is not None:
                    raise self._error
                return

    def result(self, timeout: float | None = 60.0) -> GenerationResult:
        """The outcome (raises the request's error; `TimeoutError` after `timeout` s)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    # ---- the scheduler's side
    def put_text(self, text: str) -> None:
        """(scheduler) Append a text delta and tell the listener."""
        if not text:
            return
        with self._cond:
            self._deltas.append(text)
            self._cond.notify_all()
        self._ping()

    def settle(self, result: GenerationResult | None, error: BaseException | None) -> None:
        """(scheduler) Record the outcome, once, and tell the listener."""
        with self._cond:
            if self._done:
                return
            self._result, self._error, self._done = result, error, True
            self._cond.notify_all()
        self._ping()

    def _ping(self) -> None:
        if self._notify is not None:
            try:
                self._notify(self)
            except Exception:  # a listener must not stop the scheduler
                log.exception("generation listener of request %d failed", self.id)


@dataclasses.dataclass(eq=False)
class RequestState:
    """The scheduler's record of one request (touched by the scheduler thread only)."""

    handle: GenerationHandle
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: str | None
    detok: IncrementalDetokenizer
    text: StopText
    generator: torch.Generator
    release: Callable[[], None] | None = None  # called once when the request leaves
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    kv: KV | None = None
    pending: int | None = None  # sampled, not yet fed to the model
    finish_reason: FinishReason | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)

    @classmethod
    def new(
        cls,
        handle: GenerationHandle,
        prompt_ids: Sequence[int],
        tokenizer: Any,
        *,
        detok_context: Sequence[int] = (),
        release: Callable[[], None] | None = None,
        device: Any = "cpu",
        tokenizer_lock: Any = None,
    ) -> RequestState:
        return cls(
            handle=handle,
            prompt_ids=tuple(int(i) for i in prompt_ids),
            params=handle.params,
            adapter=handle.adapter,
            detok=IncrementalDetokenizer(tokenizer, detok_context, tokenizer_lock),
            text=StopText(handle.params.stop),
            generator=make_generator(handle.params.seed, device),
            release=release,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        return GenerationResult(
            text=self.text.text,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            token_ids=tuple(self.generated),
            logprobs=tuple(self.logprobs),
            adapter=self.adapter,
        )

    def leave(self, error: BaseException | None = None) -> None:
        """Free the cache, hand the outcome to the caller, release what the request held (once)."""
        self.kv = None
        self.pending = None
        if error is not None:
            self.handle.settle(None, error)
        else:
            self.handle.settle(self.result(), None)
        rel, self.release = self.release, None
        if rel is not None:
            try:
                rel()
            except Exception:
                log.exception("releasing request %d failed", self.handle.id)


def check_context(prompt_tokens: int, max_tokens: int, max_context: int) -> str | None:
    """Why a request does not fit the model's context (None: it fits)."""
    if prompt_tokens < 1:
        return "the prompt is empty: at least one token is needed"
    if prompt_tokens + max_tokens > max_context:
        return (
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
            "completion). Please reduce the prompt or max_tokens."
        )
    return None


__all__ = [
    "FinishReason",
    "GenerationHandle",
    "GenerationResult",
    "RequestState",
    "check_context",
]
