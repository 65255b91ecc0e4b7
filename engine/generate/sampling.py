"""Sampling rules: the parameters a request may set and how one next token is chosen.

`SamplingParams` validates itself (OpenAI's ranges); `choose_token(logits, params, generator)`
picks from one row of logits: greedy at temperature 0, else temperature scaling, then
nucleus (top_p) filtering, then a draw from the request's own `torch.Generator` (seeded
from `seed`, so a seeded request is reproducible whatever else is in the batch). The
log-probability returned is the model's own (log-softmax of the raw logits), as OpenAI's
`logprobs` reports it, whatever temperature was used to draw.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from typing import Any

import torch

from loraflight.errors import EngineError

MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request may set about its generation (validated on construction)."""

    max_tokens: int = 16  # tokens to generate at most (finish_reason "length" when reached)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # the request's own generator; None: a fresh random seed
    stop: tuple[str, ...] = ()  # generation ends before the first of these in the decoded text

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= MAX_TEMPERATURE:
            problems.append(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
            problems.append(f"top_p must be a number in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not -(2**63) <= s < 2**64):
            problems.append(f"seed must be an integer (64-bit), got {s!r}")
        stops = self.stop
        if not isinstance(stops, tuple) or not all(isinstance(x, str) for x in stops):
            problems.append(f"stop must be a tuple of strings, got {stops!r}")
        elif len(stops) > MAX_STOPS:
            problems.append(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
        elif any(not x or len(x) > MAX_STOP_CHARS for x in stops):
            problems.append(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        if problems:
            raise EngineError("; ".join(problems))

    @staticmethod
    def stops_of(stop: str | Sequence[str] | None) -> tuple[str, ...]:
        """OpenAI's `stop` (a string, a list of strings or null) as a tuple."""
        if stop is None:
            return ()
        if isinstance(stop, str):
            return (stop,)
        if isinstance(stop, Sequence) and all(isinstance(x, str) for x in stop):
            return tuple(stop)
        raise EngineError(f"stop must be a string or a list of strings, got {stop!r}")


def make_generator(seed: int | None, device: Any = "cpu") -> torch.Generator:
    """The request's own random generator: seeded from `seed`, else from the OS."""
    g = torch.Generator(device=device)
    g.manual_seed((secrets.randbits(63) if seed is None else seed) % (2**64))
    return g


def choose_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, float]:
    """(token id, the model's log-probability of it) chosen from one row of logits (V,)."""
    if logits.dim() != 1:
        raise EngineError(f"choose_token takes one row of logits (V,), got shape {tuple(logits.shape)}")
    row = logits.float()
    logp = torch.log_softmax(row, dim=-1)
    if params.temperature == 0:
        tok = int(torch.argmax(row))
        return tok, float(logp[tok])
    probs = torch.softmax(row / float(params.temperature), dim=-1)
    if params.top_p < 1.0:
        probs = nucleus(probs, float(params.top_p))
    tok = int(torch.multinomial(probs, 1, generator=generator))
    return tok, float(logp[tok])


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` (V,) restricted to the smallest most-probable set reaching `top_p`, renormalised."""
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each
    keep_sorted = before < top_p  # the top token always stays (0 < top_p)
    keep = torch.zeros_like(keep_sorted).scatter_(0, order, keep_sorted)
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


__all__ = [
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "MAX_TEMPERATURE",
    "SamplingParams",
    "choose_token",
    "make_generator",
    "nucleus",
]
