"""The `Store` facade: card files named by digest plus the SQLite index of their headers.

Theory of operation
-------------------
Layout under `root`::

    cards/<digest>.lora.arrow   immutable card files (written to tmp/, fsynced, renamed)
    tmp/                        files being received; emptied on every open
    pieces/<digest>/            verified pieces of a card being fetched, kept across restarts
                                (see `pieces`; swept on every open and deleted on commit)
    index.sqlite                headers, flags, catalog epoch, known locations, trust

A card enters in this order: bytes to a temp file (hashed as they arrive when the row
count is known; see `staging`) -> fsync -> structural open of the temp file, values,
digest, trust policy and name@version conflict checks -> rename into cards/ -> fsync the
directory -> one SQLite transaction (row + epoch bump; see `index`). A crash before the
rename leaves only a temp file (deleted on open); after it, an orphan file the next open
re-verifies and re-indexes; rows whose file is missing are dropped. So a killed node
restarts with a consistent store and never holds a partial or unverified card.

The catalog epoch only grows: every add and remove bumps it in the same transaction.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from loraflight.engine.card import CARD_SUFFIX, CardHeader, LoRACard, check_digest, upgrade_pair
from loraflight.engine.keys import load_public_b64, signer_id
from loraflight.errors import CardError, CardNotFound, ConflictError, LoraflightError, StoreError, TrustError
from loraflight.files import replace

from ..pause import pause_point
from ..protocol import CatalogEntry, Criteria
from ..trust import TrustedKey, check_entry, check_mode
from ..withdrawal import Withdrawal, WithdrawResult, withdrawal_refusal
from .bundle import BundleReceiver, VerifiedFile
from .disk import DirSync, disk_error
from .eviction import choose_victims
from .index import MAX_LOCATIONS, CardIndex
from .pieces import KeptCard, KeptPieces, kept_cap
from .staging import StagedCard

log = logging.getLogger("loraflight.federation.store")

Listener = Callable[[str, CatalogEntry], None]
TOUCH_INTERVAL_S = 10.0  # LRU resolution: a card's last use is written at most this often


class Store:
    """Cards as files named by digest, an SQLite index, a growing epoch, an LRU byte cap."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        trust: str = "open",
        withdraw_owners: bool = True,
    ) -> None:
        self.root = Path(root)
        # whether a name's owner (its first signer here) may withdraw it, beside trust.keys
        # (a node sets this from trust.engine == "signed"; see withdrawal.withdrawal_refusal)
        self.withdraw_owners = withdraw_owners
        self._refused: dict[str, str] = {}  # signature -> why, for withdrawals refused (logged once)
        self.cards_dir = self.root / "cards"
        self.tmp_dir = self.root / "tmp"
        self.pieces = KeptPieces(self.root / "pieces")
        self.max_bytes = max_bytes
        self.trust_mode = check_mode(trust)
        try:
            self.cards_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self._index = CardIndex(self.root / "index.sqlite")
        except OSError as e:
            raise disk_error(e, f"cannot open the store at {self.root}") from None
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the store index at {self.root}: {e}") from None
        self._lock = self._index.lock
        # temp names: a random prefix per Store object plus a counter (unique in tmp/ even when
        # several processes share the store; no random read per card)
        self._tmp_prefix = uuid.uuid4().hex[:16]
        self._tmp_seq = itertools.count()
        self._dir_sync = DirSync(self.cards_dir)  # group commit of the cards/ directory fsync
        self._groups = itertools.count(1)  # commit_group calls, numbered
        self._touched: dict[str, float] = {}
        self._listeners: list[Listener] = []
        self._closed = False
        self.repair()
        self.sweep_pieces()

    # -- lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def temp_path(self) -> Path:
        """A fresh name in tmp/ for a file being written (see `StagedCard`)."""
        return self.tmp_dir / f"{self._tmp_prefix}-{next(self._tmp_seq)}.part"

    def path_of(self, digest: str) -> Path:
        return self.cards_dir / f"{check_digest(digest)}{CARD_SUFFIX}"

    # -- listeners
    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call `callback(event, entry)` after each committed add ("added") or remove ("removed")."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unsubscribe

    def _emit(self, event: str, entry: CatalogEntry) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(event, entry)
            except Exception:
                log.exception("store listener %r failed on %s %s", cb, event, entry.ref)

    # -- queries
    @property
    def epoch(self) -> int:
        return self._index.epoch

    def entry(self, digest: str) -> CatalogEntry | None:
        return self._index.entry(digest)

    def entry_exists(self, digest: str) -> bool:
        return self._index.exists(digest)

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self.entry(digest) is not None

    def __len__(self) -> int:
        return self._index.count()

    def list(self, criteria: Criteria | Mapping[str, Any] | None = None, **kw: Any) -> list[CatalogEntry]:
        """Entries matching criteria (name glob, base_model, tags, since, limit); no file is opened."""
        if criteria is None:
            criteria = Criteria.from_kwargs(kw)
        elif isinstance(criteria, Mapping):
            criteria = Criteria.from_kwargs(criteria)
        return self._index.list(criteria)

    def find(self, name: str, version: int | str = "latest") -> CatalogEntry:
        """The entry for name@version (`latest`: the highest version held)."""
        return self._index.find(name, version)

    def get(self, digest: str, *, touch: bool = True) -> LoRACard:
        """The card mapped from its file (zero-copy); touches it for the LRU."""
        if not self._index.exists(digest):
            raise CardNotFound(f"no card with digest {digest[:16]}… in this store")
        card = LoRACard.open(self.path_of(digest))
        if touch:
            self.touch(digest)
        return card

    def touch(self, digest: str, *, force: bool = False) -> None:
        """Record a use for the LRU (written at most once per TOUCH_INTERVAL_S per card)."""
        now = time.time()
        with self._lock:
            if not force and now - self._touched.get(digest, 0.0) < TOUCH_INTERVAL_S:
                return
            if len(self._touched) > 100_000:
                self._touched.clear()
            self._touched[digest] = now
            self._index.set_last_use(digest, now)

    def stats(self) -> dict[str, int]:
        return self._index.stats()

    # -- locations
    def locations(self, digest: str) -> builtins.list[str]:
        return self._index.locations(digest)

    def add_locations(self, digest: str, uris: Iterable[str]) -> None:
        self._index.add_locations(digest, uris)

    # -- flags
    def pin(self, digest: str, pinned: bool = True) -> None:
        if not self._index.set_pinned(digest, pinned):
            raise CardNotFound(f"no card with digest {digest[:16]}… to pin")

    def unpin(self, digest: str) -> None:
        self.pin(digest, False)

    def set_published(self, digest: str, published: bool = True) -> None:
        self._index.set_published(digest, published)

    # -- trust
    def trusted_keys(self) -> dict[str, TrustedKey]:
        return self._index.trusted_keys()

    def trust_add(self, key_b64: str, *, label: str = "", names: Iterable[str] = ()) -> TrustedKey:
        try:
            load_public_b64(key_b64)
        except (ValueError, TypeError) as e:
            raise TrustError(f"not an Ed25519 public key (base64 of 32 raw bytes): {e}") from None
        tk = TrustedKey(key_b64, signer_id(key_b64), label, tuple(names))
        self._index.put_trusted(tk)
        return tk

    def trust_remove(self, key_or_signer: str) -> bool:
        return self._index.delete_trusted(key_or_signer)

    def owner(self, name: str) -> str | None:
        return self._index.owner(name)

    def check_admission(self, header: CardHeader) -> CatalogEntry | None:
        """Trust policy and name@version conflict checks; returns the existing entry of this digest."""
        with self._lock:
            # one query finds both this digest and any other digest holding name@version
            held = self._index.holders(header.digest, header.name, header.version)
            if header.digest not in held:
                self.check_not_withdrawn(header.name, header.version)
            if header.digest in held:
                return self.entry(header.digest)
            other = self.entry(held[0]) if len(held) == 1 else None
            if other is not None and upgrade_pair(header, other.header):
                return other  # one card before and after `card upgrade`: the store keeps the one it has
            if held:
                raise ConflictError(
                    f"{header.ref} already exists here with digest {held[0][:16]}…, and this card has "
                    f"digest {header.digest[:16]}…: cards are immutable, publish a new version instead"
                )
            if self.trust_mode == "open":  # trusted keys and owners only matter under 'signed'
                check_entry(header, mode="open", trusted={}, owner=None)
            else:
                check_entry(
                    header, mode=self.trust_mode, trusted=self.trusted_keys(), owner=self.owner(header.name)
                )
        return None

    # -- withdrawals
    def withdrawal(self, name: str, version: int) -> Withdrawal | None:
        """The withdrawal of name@version this store keeps, or None."""
        rec = self._index.withdrawal(name, int(version))
        return Withdrawal.from_json(rec) if rec is not None else None

    def withdrawals(self) -> builtins.list[Withdrawal]:
        """Every withdrawal this store keeps (for good), by name then version."""
        return [Withdrawal.from_json(r) for r, _d, _e in self._index.withdrawals()]

    def check_not_withdrawn(self, name: str, version: int) -> None:
        """Raise ConflictError, saying why, when name@version was withdrawn."""
        w = self.withdrawal(name, version)
        if w is not None:
            why = f" ({w.reason})" if w.reason else ""
            raise ConflictError(
                f"{w.ref} was withdrawn by {w.signer} at {w.time or '?'}{why}: it is refused here for good; "
                "publish the fix as a new version"
            )

    def withdraw(self, w: Withdrawal) -> WithdrawResult:
        """Honour a signed withdrawal: keep it for good, delete every card of name@version.

        Raises TrustError (logged once per record) unless `withdrawal_refusal` allows it.
        A withdrawal kept already is a no-op (`new` False).
        """
        if self._index.withdrawal(w.name, w.version) is not None:
            return WithdrawResult(w, False)
        with self._lock:
            trusted = self.trusted_keys()
        why = withdrawal_refusal(
            w, owner=self.owner(w.name), trusted=trusted, owners_count=self.withdraw_owners
        )
        if why is not None:
            sig = w.signature or w.ref
            if sig not in self._refused:
                if len(self._refused) > 1000:
                    self._refused.clear()
                self._refused[sig] = why
                log.warning("%s", why)
            raise TrustError(why)
        new, dropped = self._index.withdraw(w.name, w.version, w.to_json().decode())
        for e in dropped:
            with contextlib.suppress(OSError):
                os.unlink(self.path_of(e.digest))
        for k in self.pieces.kept():  # a card of name@version being fetched: its pieces go too
            if k.header is not None and (k.header.name, k.header.version) == (w.name, w.version):
                self.pieces.drop(k.digest)
        if new:
            log.warning(
                "withdrawal of %s by %s honoured%s: %d card(s) deleted",
                w.ref,
                w.signer,
                f" ({w.reason})" if w.reason else "",
                len(dropped),
            )
        for e in dropped:
            self._emit("removed", e)
        return WithdrawResult(w, new, tuple(e.digest for e in dropped))

    # -- adding
    def stage(
        self,
        schema: pa.Schema,
        *,
        rows: int | None = None,
        max_bytes: int | None = None,
        expect_digest: str | None = None,
        expect: CatalogEntry | None = None,
    ) -> StagedCard:
        """Start receiving a card whose stream has `schema`; see StagedCard.

        `expect`: the listing entry being fetched; its digest is required and, when the stream
        carries byte-identical header JSON, its already parsed header is reused.
        """
        return StagedCard(
            self, schema, rows=rows, max_bytes=max_bytes, expect_digest=expect_digest, expect=expect
        )

    def receive_bundle(
        self,
        expected: Sequence[CatalogEntry],
        *,
        source: str,
        locations: dict[str, tuple[str, ...]] | None = None,
    ) -> BundleReceiver:
        """Start receiving a bundle of the listed `expected` cards; see BundleReceiver."""
        return BundleReceiver(self, expected, source=source, locations=locations)

    def add(
        self,
        card_or_path: LoRACard | str | os.PathLike[str],
        *,
        source: str = "local",
        published: bool = False,
        pinned: bool = False,
        locations: Iterable[str] = (),
    ) -> CatalogEntry:
        """Verify (values, digest, trust, conflicts) and store a card; returns its entry.

        Adding a digest already held only updates its flags and locations.
        """
        card = card_or_path if isinstance(card_or_path, LoRACard) else LoRACard.open(card_or_path)
        card.verify()
        existing = self.check_admission(card.header)
        if existing is not None:
            same = existing.digest == card.header.digest  # else the upgrade pair's other card
            return self._merge_existing(existing, published, pinned, locations if same else ())
        tmp = self.temp_path()
        try:
            try:
                with open(tmp, "wb") as f:
                    card.write_to(f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise disk_error(e, f"cannot store {card.ref}") from None
            pause_point("after_fsync")
            return self.commit_file(tmp, card.header, len(card), source, published, pinned, locations)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _merge_existing(
        self, existing: CatalogEntry, published: bool, pinned: bool, locations: Iterable[str]
    ) -> CatalogEntry:
        self._index.raise_flags(existing.digest, published, pinned)
        locs = list(locations)
        if locs:
            self.add_locations(existing.digest, locs)
        return self.entry(existing.digest) or existing

    def commit_file(
        self,
        tmp: Path,
        header: CardHeader,
        rows: int,
        source: str,
        published: bool,
        pinned: bool,
        locations: Iterable[str],
    ) -> CatalogEntry:
        """Rename a verified, fsynced temp file into cards/ and index it (trust + conflicts re-checked).

        The last step of `add` and of `StagedCard.commit`; `tmp` must already be verified.
        """
        existing = self.check_admission(header)
        if existing is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.pieces.drop(header.digest)
            same = existing.digest == header.digest  # else the upgrade pair's other card
            return self._merge_existing(existing, published, pinned, locations if same else ())
        final = self.path_of(header.digest)
        size = os.path.getsize(tmp)
        pause_point("before_rename")
        try:
            # not durable here: concurrent committers share one directory fsync (group commit)
            replace(tmp, final, durable=False)
            self._dir_sync.sync()
        except OSError as e:
            raise disk_error(e, f"cannot store {header.ref}") from None
        pause_point("before_index_commit")
        try:
            entry = self._index.insert(header, rows, size, source, published, pinned, locations)
        except BaseException:
            if not self._index.exists(header.digest):
                with contextlib.suppress(OSError):
                    os.unlink(final)
            raise
        self.pieces.drop(entry.digest)  # kept pieces of a card being fetched are done with
        self._emit("added", entry)
        self.evict(keep=entry.digest)
        return entry

    def commit_group(
        self, files: Sequence[VerifiedFile], *, published: bool = False, pinned: bool = False
    ) -> builtins.list[CatalogEntry | LoraflightError]:
        """Store several verified, fsynced temp files as one group: admission checked for each,
        every file renamed into cards/, the directory fsynced once, one index transaction.

        The group form of `commit_file` (used by `BundleReceiver`); per file its entry, or the
        error that kept it out (the others still commit). A kill at any step leaves whole cards
        only: temp files before the renames, re-verified orphans after them (see `repair`).
        """
        out: builtins.list[CatalogEntry | LoraflightError | None] = [None] * len(files)
        todo: builtins.list[tuple[int, VerifiedFile, Path]] = []
        for i, f in enumerate(files):
            try:
                existing = self.check_admission(f.header)
            except LoraflightError as e:
                out[i] = e
                continue
            if existing is not None:
                same = existing.digest == f.header.digest
                out[i] = self._merge_existing(existing, published, pinned, f.locations if same else ())
                continue
            todo.append((i, f, self.path_of(f.header.digest)))
        if todo:
            seq = next(self._groups)  # the n-th group this store commits (pause points count them)
            pause_point("group_before_rename", seq)
            try:
                for k, (_i, f, final) in enumerate(todo):
                    replace(f.tmp, final, durable=False)
                    pause_point("group_renamed", k + 1)
                self._dir_sync.sync()
            except OSError as e:
                raise disk_error(e, f"cannot store a group of {len(todo)} cards") from None
            pause_point("group_before_index_commit", seq)
            items = [
                (f.header, f.rows, os.path.getsize(final), f.source, published, pinned, f.locations)
                for _i, f, final in todo
            ]
            try:
                results = self._index.insert_many(items)
            except BaseException:
                for _i, f, final in todo:
                    if not self._index.exists(f.header.digest):
                        with contextlib.suppress(OSError):
                            os.unlink(final)
                raise
            for (i, f, final), res in zip(todo, results, strict=True):
                if isinstance(res, ConflictError) and not self._index.exists(f.header.digest):
                    with contextlib.suppress(OSError):
                        os.unlink(final)
                out[i] = res
            added = [r for r in results if not isinstance(r, ConflictError)]
            for res in added:
                self.pieces.drop(res.digest)
                self._emit("added", res)
            self.evict(keep=added[-1].digest if added else None)
        return [r if r is not None else StoreError("not committed") for r in out]

    # -- removing
    def remove(self, digest: str) -> CatalogEntry:
        """Drop a card from the index and delete its file (open maps stay valid)."""
        entry = self._index.delete(digest)
        if entry is None:
            raise CardNotFound(f"no card with digest {digest[:16]}… to remove")
        with contextlib.suppress(OSError):
            os.unlink(self.path_of(digest))
        self._emit("removed", entry)
        return entry

    def evict(self, keep: str | None = None) -> builtins.list[CatalogEntry]:
        """Remove least-recently-used fetched cards (never pinned, published or local) over max_bytes.

        `keep` (the card just added) is never chosen, so an add is not undone by its own eviction.
        """
        if self.max_bytes is None:
            return []
        with self._lock:
            total = self._index.total_size()
            if total <= self.max_bytes:
                return []
            victims = choose_victims(total, self.max_bytes, self._index.by_last_use(keep))
        removed = []
        for digest in victims:
            with contextlib.suppress(CardNotFound):  # removed meanwhile by another caller
                removed.append(self.remove(digest))
                log.info("evicted %s (LRU, store over %d bytes)", removed[-1].ref, self.max_bytes)
        total = self._index.total_size()
        if total > self.max_bytes:
            log.warning(
                "store is over its cap (%d > %d bytes) but nothing is evictable", total, self.max_bytes
            )
        return removed

    # -- kept pieces
    def sweep_pieces(self, keep: Iterable[str] = ()) -> dict[str, str]:
        """Delete kept pieces (`pieces.KeptPieces.sweep`) of cards stored or withdrawn, old ones
        and the oldest beyond the cap; never those of `keep`. Returns digest -> why."""

        def refuse(k: KeptCard) -> str | None:
            if self._index.exists(k.digest):
                return "its card is stored"
            if k.header is not None and self._index.withdrawal(k.header.name, k.header.version):
                return f"{k.header.ref} was withdrawn"
            return None

        return self.pieces.sweep(refuse, cap=kept_cap(self.max_bytes), keep=set(keep))

    # -- recovery
    def repair(self) -> dict[str, int]:
        """Make the index and the files agree (run on every open); returns what it did."""
        done = {"temp_removed": 0, "rows_dropped": 0, "orphans_indexed": 0, "orphans_removed": 0}
        for p in list(self.tmp_dir.iterdir())[:1_000_000]:
            with contextlib.suppress(OSError):
                p.unlink()
                done["temp_removed"] += 1
        for p in list(self.cards_dir.glob(".tmp-*")):
            with contextlib.suppress(OSError):
                p.unlink()
                done["temp_removed"] += 1
        digests = self._index.digests()
        indexed = set(digests)
        for digest in digests:
            if not self.path_of(digest).exists():
                self._index.drop_row(digest)
                done["rows_dropped"] += 1
                log.warning("store repair: dropped index row %s whose file is missing", digest[:16])
        for p in self.cards_dir.glob(f"*{CARD_SUFFIX}"):
            digest = p.name[: -len(CARD_SUFFIX)]
            if digest in indexed:
                continue
            try:
                card = LoRACard.open(p)
                card.verify()
                if card.digest != digest:
                    raise CardError(
                        f"file name says {digest[:16]}… but the card's digest is {card.digest[:16]}…"
                    )
                self.check_admission(card.header)
                n = len(card)
                header = card.header
                del card
                self._index.insert(header, n, p.stat().st_size, "recovered", False, False, ())
                done["orphans_indexed"] += 1
                log.warning("store repair: re-indexed orphan card file %s", p.name)
            except (CardError, ConflictError) as e:
                with contextlib.suppress(OSError):
                    p.unlink()
                done["orphans_removed"] += 1
                log.warning("store repair: removed card file %s: %s", p.name, e)
        return done


__all__ = ["MAX_LOCATIONS", "TOUCH_INTERVAL_S", "Listener", "Store"]
