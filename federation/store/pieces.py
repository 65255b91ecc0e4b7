"""Verified pieces of cards being fetched, kept across kills and restarts (a swarm fetch
resumes from them).

Layout under the store's root::

    pieces/<digest>/header.json   the card's header JSON (hashes to <digest>; names name@version)
    pieces/<digest>/<i>.piece     piece i: an Arrow IPC file of one record batch

A piece is written to tmp/ first, mapped back and verified there, and only then renamed in
(`put`), so a kill leaves whole verified piece files here, or garbage in tmp/ that every open
removes. Nothing here is trusted on the way back: a fetch that picks kept pieces up verifies
each again against the header (`swarm.PartialCard.resume`), so a file cut short or changed on
disk (or left unsynced by a power loss: renames here are not fsynced) is dropped and fetched
again. A folder's name is a digest checked by `check_digest` (64 lowercase hex characters);
piece files are looked up by the indexes the header lists, never by names read from disk.

Bounded (`sweep`: on every open of the store and when a swarm fetch starts): a folder goes
when its card is stored, its name@version is withdrawn, its header is missing or does not
hash to its name, nothing was written into it for KEPT_MAX_AGE_S, or, oldest first, while the
folders together hold more than `kept_cap` bytes. The store also deletes a card's folder when
it commits the card and when it honours a withdrawal of its name@version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path

from loraflight.engine.card import MAX_HEADER_BYTES, CardHeader, check_digest, header_digest
from loraflight.errors import CardError
from loraflight.files import atomic_write, replace

from ..protocol import MAX_CARD_BYTES

log = logging.getLogger("loraflight.federation.store")

KEPT_MAX_AGE_S = 24 * 3600.0  # a folder nothing was written into for this long is swept
KEPT_SHARE = 0.5  # of a store's byte cap that kept pieces may fill (a card needs room anyway)
KEPT_MAX_BYTES = MAX_CARD_BYTES  # kept pieces in a store without a cap: one card at the limit
HEADER_FILE = "header.json"
PIECE_SUFFIX = ".piece"


def kept_cap(max_bytes: int | None) -> int:
    """The bytes kept pieces may fill in a store capped at `max_bytes` (None: no cap)."""
    return KEPT_MAX_BYTES if max_bytes is None else int(max_bytes * KEPT_SHARE)


@dataclasses.dataclass(frozen=True)
class KeptCard:
    """One folder of kept pieces: its digest, header (None when missing or not the digest's),
    bytes on disk and when a piece was last written into it."""

    digest: str
    header: CardHeader | None
    size: int
    mtime: float


class KeptPieces:
    """The `pieces/` folder of a store (created on the first piece kept)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, digest: str) -> Path:
        return self.root / check_digest(digest)

    def piece_path(self, digest: str, index: int) -> Path:
        return self.folder(digest) / f"{int(index)}{PIECE_SUFFIX}"

    def put(self, digest: str, header_json: bytes, index: int, tmp: Path) -> Path:
        """Rename the verified piece file `tmp` (in the store's tmp/) in as piece `index`."""
        folder = self.folder(digest)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / HEADER_FILE).exists():
            atomic_write(folder / HEADER_FILE, header_json, durable=False)
        return replace(tmp, self.piece_path(digest, index), durable=False)

    def found(self, digest: str, count: int) -> dict[int, Path]:
        """The piece files kept for `digest` (a card of `count` pieces), by index; anything else
        in its folder (a temp file a kill left, a name no piece has) is deleted."""
        folder = self.folder(digest)
        names = {f"{i}{PIECE_SUFFIX}": i for i in range(count)}
        out: dict[int, Path] = {}
        with contextlib.suppress(FileNotFoundError):
            for p in list(folder.iterdir()):
                i = names.get(p.name)
                if i is not None and p.is_file():
                    out[i] = p
                elif p.name != HEADER_FILE:
                    _remove(p)
        return dict(sorted(out.items()))

    def drop(self, digest: str) -> bool:
        """Delete every piece kept for `digest`; whether there were any."""
        folder = self.folder(digest)
        if not folder.exists():
            return False
        _remove(folder)
        return True

    def kept(self) -> list[KeptCard]:
        """Every folder of kept pieces; entries that are no digest's folder are deleted."""
        out: list[KeptCard] = []
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return out
        for p in entries:
            try:
                digest = check_digest(p.name)
            except CardError:
                _remove(p)
                continue
            if p.is_symlink() or not p.is_dir():
                _remove(p)
                continue
            try:
                st = p.stat()
                size = sum(f.stat().st_size for f in p.iterdir())
            except OSError:
                continue  # removed meanwhile
            out.append(KeptCard(digest, _read_header(p / HEADER_FILE, digest), size, st.st_mtime))
        return out

    def sweep(
        self,
        refuse: Callable[[KeptCard], str | None],
        *,
        cap: int,
        keep: Collection[str] = (),
        now: float | None = None,
    ) -> dict[str, str]:
        """Delete the folders `refuse` names a reason for, those with no valid header or older
        than KEPT_MAX_AGE_S, then the oldest while all together exceed `cap` bytes, and in those
        that stay every file that is not a piece or the header; never touches those of `keep`
        (cards being fetched now). Returns digest -> why, for each folder deleted."""
        now = time.time() if now is None else now
        gone: dict[str, str] = {}
        left: list[KeptCard] = []
        for k in self.kept():
            if k.digest in keep:
                left.append(k)
                continue
            why = (
                "its header is missing or is not this digest's"
                if k.header is None
                else f"untouched for {(now - k.mtime) / 3600:.0f} h"
                if now - k.mtime > KEPT_MAX_AGE_S
                else refuse(k)
            )
            if why is None:
                left.append(k)
            else:
                gone[k.digest] = why
        total = sum(k.size for k in left)
        for k in sorted(left, key=lambda k: k.mtime):
            if total <= cap:
                break
            if k.digest in keep:
                continue
            gone[k.digest] = f"kept pieces exceed {cap} bytes (oldest go first)"
            total -= k.size
        for digest, why in gone.items():
            self.drop(digest)
            log.info("kept pieces of %s… deleted: %s", digest[:16], why)
        for k in left:  # those that stay hold whole piece files only (a kill's temp files go)
            if k.digest not in gone and k.digest not in keep and k.header is not None:
                self.found(k.digest, len(k.header.pieces))
        return gone


def _read_header(path: Path, digest: str) -> CardHeader | None:
    """The header kept in `path` when it is readable and hashes to `digest`, else None."""
    try:
        if path.stat().st_size > MAX_HEADER_BYTES:
            return None
        header = CardHeader.from_json(path.read_bytes())
        if header.major < 2 or header_digest(header) != digest:
            return None
        return header
    except (OSError, CardError):
        return None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(p)


__all__ = [
    "HEADER_FILE",
    "KEPT_MAX_AGE_S",
    "KEPT_MAX_BYTES",
    "KEPT_SHARE",
    "PIECE_SUFFIX",
    "KeptCard",
    "KeptPieces",
    "kept_cap",
]
