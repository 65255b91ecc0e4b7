"""A card's verification run beside its load, and the memo of cards already verified.

Cards that passed verification are remembered: a card file is immutable once written
(writers replace it by rename), so (path, device, inode, size, mtime, ctime, digest)
identifies verified bytes; an in-memory card is remembered by identity. Bounded. A memo
hit with trust= still checks the signature against the trusted keys (an Ed25519 verify,
no hashing of tensors).
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from loraflight.errors import CardError, LoraflightError

from .card import DigestJob, LoRACard, PieceJob, check_digest_matches, check_signature

VERIFIED: collections.OrderedDict[Any, bool] = collections.OrderedDict()
_VERIFIED_LOCK = threading.Lock()
_VERIFIED_MAX = 4096


def verified_key(card: LoRACard) -> Any:
    """What identifies this card's verified bytes in the memo (None: a file that is gone)."""
    if card.path is None:
        return ("obj", id(card), card.digest, weakref.ref(card))
    try:
        st = os.stat(card.path)
    except OSError:
        return None
    return (
        "file",
        os.fspath(card.path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        card.digest,
    )


def remember_verified(key: Any) -> None:
    with _VERIFIED_LOCK:
        VERIFIED[key] = True
        while len(VERIFIED) > _VERIFIED_MAX:
            VERIFIED.popitem(last=False)


def forget_verified() -> None:
    """Empty the memo (benchmarks measure the full verification with it)."""
    with _VERIFIED_LOCK:
        VERIFIED.clear()


class Verifying:
    """One card's verification, run beside the load (see docs/engine.md, "Loading").

    Unless the card is known verified (the memo), its digest is hashed by a `DigestJob` in a
    helper thread from the moment the load starts. The signature and trust are checked here at
    once (one Ed25519 verify), their error held back so that a digest mismatch is reported
    first, as `LoRACard.verify` does; values are checked finite by the copy (the engine's
    prepare step). `finish()` waits for the digest and raises the first failure; it runs
    before the commit.
    """

    def __init__(self, card: LoRACard, trusted: list[str] | None) -> None:
        self.card = card
        self.memo = verified_key(card)
        self.known = self.memo is not None and self.memo in VERIFIED
        self.job: DigestJob | PieceJob | None = None
        self.error: LoraflightError | None = None
        if not self.known:
            try:
                self.job = card.digest_job()
            except LoraflightError:
                raise
            except Exception as e:  # a corrupt card must not crash the caller with a bare error
                raise CardError(f"{card.ref}: verification failed: {e}") from e
        if trusted is not None or not self.known:
            try:
                check_signature(card.header, trusted)
            except LoraflightError as e:
                self.error = e

    def finish(self) -> None:
        if self.job is not None:
            check_digest_matches(self.card, self.job.result())
            self.job = None
        if self.error is not None:
            raise self.error
        if self.memo is not None and not self.known:
            remember_verified(self.memo)
            self.known = True

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()


def finish_all(checks: Sequence[Verifying]) -> None:
    for c in checks:
        c.finish()


__all__ = ["VERIFIED", "Verifying", "finish_all", "forget_verified", "remember_verified", "verified_key"]
