"""The store's SQLite index: card headers and flags, the catalog epoch, known locations,
name owners and trusted keys.

`CardIndex` is the only code that speaks SQL. It holds no policy: the store decides what
may enter or leave, the index records it, one transaction per change. Every add and
remove bumps the epoch in the same transaction, so the epoch only grows.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from loraflight.engine.card import CardHeader
from loraflight.errors import CardNotFound, ConflictError

from ..protocol import CatalogEntry, Criteria
from ..trust import TrustedKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cards (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_model TEXT,
    tags TEXT NOT NULL,
    size INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    source TEXT NOT NULL,
    signer TEXT,
    signer_key TEXT,
    created TEXT,
    epoch INTEGER NOT NULL,
    last_use REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    published INTEGER NOT NULL DEFAULT 0,
    header TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS cards_epoch ON cards (epoch);
CREATE TABLE IF NOT EXISTS locations (
    digest TEXT NOT NULL, uri TEXT NOT NULL, seen REAL NOT NULL, PRIMARY KEY (digest, uri)
);
CREATE TABLE IF NOT EXISTS owners (name TEXT PRIMARY KEY, signer_key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trusted (
    key TEXT PRIMARY KEY, signer TEXT NOT NULL, label TEXT NOT NULL, names TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS withdrawals (
    name TEXT NOT NULL, version INTEGER NOT NULL, record TEXT NOT NULL, digests TEXT NOT NULL,
    epoch INTEGER NOT NULL, received REAL NOT NULL, PRIMARY KEY (name, version)
);
"""
_COLS = "digest, name, version, base_model, tags, size, rows, source, pinned, published, header, epoch"
MAX_LOCATIONS = 32  # remembered per digest
HEADER_MEMO = 16384  # parsed headers kept by the index (a few KiB each)


class CardIndex:
    """The SQLite file `index.sqlite`; thread-safe (one connection behind `lock`, an RLock
    that callers may hold around several calls that must see one state)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open or create the index (raises `sqlite3.Error` or `OSError`; the store words them)."""
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process kill; a power loss may drop the
            # last commits but never corrupts, and the store's repair re-indexes any card file left.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except BaseException:
            self._db.close()
            raise
        self.lock = threading.RLock()
        self._headers: dict[bytes, CardHeader] = {}  # stored header bytes -> parsed (`_header`)

    def close(self) -> None:
        with self.lock:
            self._db.close()

    # -- epoch
    @property
    def epoch(self) -> int:
        with self.lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        return int(row[0]) if row else 0

    def _bump_epoch(self) -> int:
        # caller holds the lock inside a transaction; one statement reads and bumps
        row = self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', '1') "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
        ).fetchone()
        return int(row[0])

    # -- entries
    def _header(self, raw: bytes) -> CardHeader:
        """The header stored as `raw`, parsed once: a listing of N cards would otherwise parse
        and re-encode N headers per call. Keyed by the bytes themselves (a header is immutable;
        other bytes are another key), bounded; caller holds the lock."""
        h = self._headers.get(raw)
        if h is None:
            h = CardHeader.from_json(raw)
            if len(self._headers) >= HEADER_MEMO:
                self._headers.pop(next(iter(self._headers)))  # the oldest
            self._headers[raw] = h
        return h

    def _entry(self, row: tuple[Any, ...]) -> CatalogEntry:
        digest, _name, _v, _bm, _tags, size, rows, source, pinned, published, header, epoch = row
        raw = header.encode()
        return CatalogEntry(
            header=self._header(raw),
            header_json=raw,
            size=size,
            rows=rows,
            locations=self._locations_locked(digest),
            source=source,
            pinned=bool(pinned),
            published=bool(published),
            epoch=epoch,
        )

    def _locations_locked(self, digest: str) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in self._db.execute(
                "SELECT uri FROM locations WHERE digest=? ORDER BY seen DESC LIMIT ?",
                (digest, MAX_LOCATIONS),
            )
        )

    def entry(self, digest: str) -> CatalogEntry | None:
        with self.lock:
            row = self._db.execute(f"SELECT {_COLS} FROM cards WHERE digest=?", (digest,)).fetchone()
            return self._entry(row) if row else None

    def exists(self, digest: str) -> bool:
        with self.lock:
            return self._db.execute("SELECT 1 FROM cards WHERE digest=?", (digest,)).fetchone() is not None

    def count(self) -> int:
        with self.lock:
            return int(self._db.execute("SELECT COUNT(*) FROM cards").fetchone()[0])

    def digests(self) -> builtins.list[str]:
        with self.lock:
            return [r[0] for r in self._db.execute("SELECT digest FROM cards").fetchall()]

    def list(self, criteria: Criteria) -> builtins.list[CatalogEntry]:
        """Entries matching `criteria`, by name then version."""
        sql = f"SELECT {_COLS} FROM cards"
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        if criteria.base_model is not None:
            where.append("base_model = ?")
            args.append(criteria.base_model)
        if criteria.digest is not None:
            where.append("digest = ?")
            args.append(criteria.digest)
        if criteria.since is not None:
            where.append("epoch > ?")
            args.append(criteria.since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name, version"
        out = []
        with self.lock:
            for row in self._db.execute(sql, args).fetchall():
                e = self._entry(row)
                if criteria.matches(e.header):
                    out.append(e)
                    if criteria.limit is not None and len(out) >= criteria.limit:
                        break
        return out

    def find(self, name: str, version: int | str = "latest") -> CatalogEntry:
        with self.lock:
            if version == "latest":
                row = self._db.execute(
                    f"SELECT {_COLS} FROM cards WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            else:
                row = self._db.execute(
                    f"SELECT {_COLS} FROM cards WHERE name=? AND version=?", (name, int(version))
                ).fetchone()
            if not row:
                raise CardNotFound(f"no card {name}@{version} in this store")
            return self._entry(row)

    def holders(self, digest: str, name: str, version: int) -> builtins.list[str]:
        """Digests held that are `digest` or hold `name@version` (one query for admission)."""
        with self.lock:
            rows = self._db.execute(
                "SELECT digest FROM cards WHERE digest=? OR (name=? AND version=?)", (digest, name, version)
            ).fetchall()
        return [r[0] for r in rows]

    def set_last_use(self, digest: str, when: float) -> None:
        with self.lock:
            self._db.execute("UPDATE cards SET last_use=? WHERE digest=?", (when, digest))

    def stats(self) -> dict[str, int]:
        with self.lock:
            n, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size),0) FROM cards").fetchone()
            pinned = self._db.execute("SELECT COUNT(*) FROM cards WHERE pinned=1").fetchone()[0]
            pub = self._db.execute("SELECT COUNT(*) FROM cards WHERE published=1").fetchone()[0]
        return {"cards": int(n), "bytes": int(size), "pinned": int(pinned), "published": int(pub)}

    def total_size(self) -> int:
        with self.lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size),0) FROM cards").fetchone()[0])

    def by_last_use(self, keep: str | None) -> builtins.list[tuple[str, int, bool, bool, str]]:
        """(digest, size, pinned, published, source) of every card but `keep`, least recently used first."""
        with self.lock:
            rows = self._db.execute(
                "SELECT digest, size, pinned, published, source FROM cards WHERE digest != ? "
                "ORDER BY last_use ASC",
                (keep or "",),
            ).fetchall()
        return [(d, int(s), bool(p), bool(pub), src) for d, s, p, pub, src in rows]

    # -- locations
    def locations(self, digest: str) -> builtins.list[str]:
        with self.lock:
            return list(self._locations_locked(digest))

    def add_locations(self, digest: str, uris: Iterable[str]) -> None:
        now = time.time()
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for u in list(uris)[:MAX_LOCATIONS]:
                    self._db.execute(
                        "INSERT OR REPLACE INTO locations (digest, uri, seen) VALUES (?, ?, ?)",
                        (digest, u, now),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- flags
    def set_pinned(self, digest: str, pinned: bool) -> bool:
        """Set the flag; False when no such card is held."""
        with self.lock:
            cur = self._db.execute("UPDATE cards SET pinned=? WHERE digest=?", (int(pinned), digest))
            return cur.rowcount > 0

    def set_published(self, digest: str, published: bool) -> None:
        with self.lock:
            self._db.execute("UPDATE cards SET published=? WHERE digest=?", (int(published), digest))

    def raise_flags(self, digest: str, published: bool, pinned: bool) -> None:
        """Set published/pinned where asked, never clear them (adding a digest already held)."""
        with self.lock:
            self._db.execute(
                "UPDATE cards SET published = MAX(published, ?), pinned = MAX(pinned, ?) WHERE digest=?",
                (int(published), int(pinned), digest),
            )

    # -- trust
    def trusted_keys(self) -> dict[str, TrustedKey]:
        with self.lock:
            rows = self._db.execute("SELECT key, signer, label, names FROM trusted").fetchall()
        return {k: TrustedKey(k, s, lbl, tuple(json.loads(n))) for k, s, lbl, n in rows}

    def put_trusted(self, tk: TrustedKey) -> None:
        with self.lock:
            self._db.execute(
                "INSERT OR REPLACE INTO trusted (key, signer, label, names) VALUES (?, ?, ?, ?)",
                (tk.key, tk.signer, tk.label, json.dumps(list(tk.names))),
            )

    def delete_trusted(self, key_or_signer: str) -> bool:
        with self.lock:
            cur = self._db.execute(
                "DELETE FROM trusted WHERE key=? OR signer=?", (key_or_signer, key_or_signer)
            )
            return cur.rowcount > 0

    def owner(self, name: str) -> str | None:
        with self.lock:
            row = self._db.execute("SELECT signer_key FROM owners WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    # -- adding and removing
    def insert(
        self,
        header: CardHeader,
        rows: int,
        size: int,
        source: str,
        published: bool,
        pinned: bool,
        locations: Iterable[str],
    ) -> CatalogEntry:
        """Index a card whose file is in place (one transaction: row, owner, locations, epoch).

        name@version is re-checked inside the transaction: another writer may have won the race.
        """
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = self._insert_locked(
                    header, rows, size, source, published, pinned, locations, time.time()
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._inserted_entry(out)

    def insert_many(
        self, items: Sequence[tuple[CardHeader, int, int, str, bool, bool, Iterable[str]]]
    ) -> builtins.list[CatalogEntry | ConflictError]:
        """Index several cards whose files are in place, in ONE transaction (one epoch bump per
        new card, one commit for the group). Each item is (header, rows, size, source, published,
        pinned, locations); a card that lost a name@version race (or was withdrawn meanwhile) is
        skipped and its ConflictError returned in its place, the others still commit."""
        now = time.time()
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                done: list[tuple[Any, ...] | ConflictError] = []
                for header, rows, size, source, published, pinned, locations in items:
                    try:
                        done.append(
                            self._insert_locked(header, rows, size, source, published, pinned, locations, now)
                        )
                    except ConflictError as e:  # raised before this item wrote anything
                        done.append(e)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return [d if isinstance(d, ConflictError) else self._inserted_entry(d) for d in done]

    def _insert_locked(
        self,
        header: CardHeader,
        rows: int,
        size: int,
        source: str,
        published: bool,
        pinned: bool,
        locations: Iterable[str],
        now: float,
    ) -> tuple[Any, ...]:
        """One card's rows inside the caller's transaction; conflicts raise before any write."""
        header_text = header.to_json().decode()
        row = self._db.execute(
            "SELECT digest FROM cards WHERE name=? AND version=?", (header.name, header.version)
        ).fetchone()
        if row and row[0] != header.digest:
            raise ConflictError(
                f"{header.ref} already exists here with digest {row[0][:16]}…: cards are immutable"
            )
        w = self._db.execute(
            "SELECT 1 FROM withdrawals WHERE name=? AND version=?", (header.name, header.version)
        ).fetchone()
        if w and not row:  # a withdrawal committed since the admission check
            raise ConflictError(f"{header.ref} was withdrawn: refused for good, publish a new version")
        inserted = not row
        epoch = 0
        if inserted:
            epoch = self._bump_epoch()
            self._db.execute(
                "INSERT INTO cards (digest, name, version, base_model, tags, size, rows, source, "
                "signer, signer_key, created, epoch, last_use, pinned, published, header) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    header.digest,
                    header.name,
                    header.version,
                    header.base_model,
                    json.dumps(list(header.tags)),
                    size,
                    rows,
                    source,
                    header.signer,
                    header.signer_key,
                    header.created,
                    epoch,
                    now,
                    int(pinned),
                    int(published),
                    header_text,
                ),
            )
            if header.signer_key is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO owners (name, signer_key) VALUES (?, ?)",
                    (header.name, header.signer_key),
                )
        locs = list(locations)[:MAX_LOCATIONS]
        if locs:
            self._db.executemany(
                "INSERT OR REPLACE INTO locations (digest, uri, seen) VALUES (?, ?, ?)",
                [(header.digest, u, now) for u in locs],
            )
        return (inserted, header, rows, size, source, pinned, published, epoch, header_text)

    def _inserted_entry(self, out: tuple[Any, ...]) -> CatalogEntry:
        """The entry of a card `_insert_locked` handled (call with the lock held)."""
        inserted, header, rows, size, source, pinned, published, epoch, header_text = out
        if not inserted:
            entry = self.entry(header.digest)
            assert entry is not None
            return entry
        # Just inserted: the entry is what we wrote (no re-read, no second header parse);
        # only the locations are read back, the table may hold older ones for this digest.
        return CatalogEntry(
            header=header,
            size=size,
            rows=rows,
            locations=self._locations_locked(header.digest),
            source=source,
            pinned=bool(pinned),
            published=bool(published),
            epoch=epoch,
            header_json=header_text.encode(),
        )

    def delete(self, digest: str) -> CatalogEntry | None:
        """Drop a card's row and locations (one transaction, epoch bumped); its entry, or None."""
        with self.lock:
            entry = self.entry(digest)
            if entry is None:
                return None
            self._delete_locked(digest)
        return entry

    def drop_row(self, digest: str) -> None:
        """Drop a row whose file is missing (repair), bumping the epoch."""
        with self.lock:
            self._delete_locked(digest)

    def _delete_locked(self, digest: str) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM cards WHERE digest=?", (digest,))
            self._db.execute("DELETE FROM locations WHERE digest=?", (digest,))
            self._bump_epoch()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # -- withdrawals (kept for good: a dropped one would let a stale peer bring the card back)
    def withdraw(self, name: str, version: int, record: str) -> tuple[bool, builtins.list[CatalogEntry]]:
        """Record a withdrawal and drop every card row of name@version, in one transaction.

        Returns (new: False when one was recorded already, the entries dropped). The epoch is
        bumped for a new withdrawal even when no card was held, so peers sync and learn of it.
        """
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute(
                    "SELECT 1 FROM withdrawals WHERE name=? AND version=?", (name, version)
                ).fetchone():
                    self._db.execute("COMMIT")
                    return False, []
                rows = self._db.execute(
                    f"SELECT {_COLS} FROM cards WHERE name=? AND version=?", (name, version)
                ).fetchall()
                dropped = [self._entry(r) for r in rows]
                epoch = self._bump_epoch()
                self._db.execute(
                    "INSERT INTO withdrawals (name, version, record, digests, epoch, received) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (name, version, record, json.dumps([e.digest for e in dropped]), epoch, time.time()),
                )
                for e in dropped:
                    self._db.execute("DELETE FROM cards WHERE digest=?", (e.digest,))
                    self._db.execute("DELETE FROM locations WHERE digest=?", (e.digest,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True, dropped

    def withdrawal(self, name: str, version: int) -> str | None:
        """The stored record (JSON text) withdrawing name@version, or None."""
        with self.lock:
            row = self._db.execute(
                "SELECT record FROM withdrawals WHERE name=? AND version=?", (name, version)
            ).fetchone()
        return row[0] if row else None

    def withdrawals(self) -> builtins.list[tuple[str, builtins.list[str], int]]:
        """(record JSON, digests dropped here, epoch) of every withdrawal, by name then version."""
        with self.lock:
            rows = self._db.execute(
                "SELECT record, digests, epoch FROM withdrawals ORDER BY name, version"
            ).fetchall()
        return [(r, json.loads(d), int(e)) for r, d, e in rows]


__all__ = ["HEADER_MEMO", "MAX_LOCATIONS", "SCHEMA", "CardIndex"]
