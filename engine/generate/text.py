"""Text out of tokens, one step at a time: incremental detokenization and stop strings (pure).

Incremental detokenization (the rule TGI and vLLM use): decode a short window of ids twice,
with and without the newest tokens, and emit what the newer decode adds. A decode that ends
in U+FFFD is an incomplete multi-byte character (byte-level BPE): nothing is emitted until
the next token completes it. WordPiece continuations (`##ing`) join the previous word
because the window always reaches back at least one emitted token; seeded with the prompt's
last tokens, a completion's first word gets the space that separates it from the prompt.

Stop strings are matched on the decoded text after each token: generation ends at the first
token whose text completes a stop string, the text a request returns ends just before the
earliest stop string in it, and a stream never sends text that a stop string could still
swallow (the longest suffix that is a prefix of a stop string is held back until the next
token decides).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 6  # prompt tokens the window starts with (enough for any leading-space rule)


class IncrementalDetokenizer:
    """Feed token ids one by one; get the text each adds (concatenated, the decoded text)."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = (), lock: Any = None) -> None:
        self._tok = tokenizer
        self._lock = lock if lock is not None else contextlib.nullcontext()  # held around each decode
        self._ids: list[int] = list(context_ids)[-_CONTEXT_TOKENS:]
        self._prefix = 0  # window start
        self._read = len(self._ids)  # ids up to here have been turned into text

    def _decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """The text `token_id` completes ('' while a character or word piece is incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)
            self._trim()
            return delta
        return ""

    def flush(self) -> str:
        """Whatever text the pending ids give (at the end of a generation)."""
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""

    def _trim(self) -> None:
        # keep the window bounded: only ids from the window start on are ever decoded again
        if self._prefix > 64:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in `text` that ends after `start` (-1: none)."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopText:
    """The decoded text of one request, with its stop strings applied as it grows."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""  # all decoded text so far (up to the stop string once stopped)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def add(self, delta: str) -> str:
        """Append decoded text; return what may be sent now (stops when a stop string appears)."""
        if self.stopped or not delta:
            return ""
        start = len(self.text)
        self.text += delta
        if self.stops:
            at = find_stop(self.text, self.stops, start)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(len(self.text) - holdback(self.text, self.stops))
        return self._take(len(self.text))

    def finish(self) -> str:
        """The end of the generation: send what was held back (it turned out not to be a stop)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent : upto]
        self.sent = upto
        return out


__all__ = ["IncrementalDetokenizer", "StopText", "find_stop", "holdback"]
