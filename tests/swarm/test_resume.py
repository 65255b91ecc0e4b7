"""A swarm fetch resumes from the verified pieces an earlier fetch of the card kept in the
store (after a SIGKILL, a stop or a failed fetch): it asks the peers only for the rest, drops
kept files that no longer verify, and the kept pieces are bounded (deleted on commit, on a
refusal for good, on withdrawal, and swept on open when old or over the cap)."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraflight.errors import ConflictError, PeerError
from loraflight.federation.client import Client
from loraflight.federation.protocol import CatalogEntry
from loraflight.federation.server import CardServer
from loraflight.federation.store import Store
from loraflight.federation.store.pieces import HEADER_FILE, KEPT_MAX_AGE_S, KEPT_SHARE
from loraflight.federation.swarm import (
    PartialCard,
    SwarmFetch,
    SwarmLimits,
    parse_piece_ticket,
    piece_ticket,
    read_pieces,
    swarm_fetch,
)
from loraflight.federation.withdrawal import new_withdrawal
from loraflight.testing import new_signer, sigkill_at_pause, wait_for

from .cards import pieced_card
from .workers import SERIAL, swarm_fetch_into

CTX = mp.get_context("spawn")
N = 8


class CountingServer(CardServer):
    """The real server, recording the piece index of every piece ticket it is asked."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.asked: list[int] = []

    def do_get(self, context: Any, ticket: Any) -> Any:
        req = parse_piece_ticket(bytes(ticket.ticket))
        if req is not None:
            self.asked.extend(req.indexes)
        return super().do_get(context, ticket)


class Side:
    """One fetching node: its store (reopened as after a restart) and server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = Store(root)
        self.server = CardServer(self.store)
        self.clients: dict[str, Client] = {}

    def connect(self, uri: str) -> Client:
        c = self.clients.get(uri)
        if c is None:
            c = self.clients[uri] = Client(uri, timeout=30.0)
        return c

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.server.stop()
        self.store.close()


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Any]:
    store = Store(tmp_path / "origin")
    card = pieced_card(pieces=N)
    store.add(card, published=True)
    servers: list[CountingServer] = []

    def serve() -> CountingServer:  # a fresh server (fresh counts) over the origin's store
        servers.append(CountingServer(store))
        return servers[-1]

    yield card, store, serve
    for s in servers:
        s.stop()
    store.close()


@pytest.fixture
def side(tmp_path: Path) -> Iterator[Any]:
    made: list[Side] = []

    def make(name: str = "fetcher") -> Side:
        made.append(Side(tmp_path / name))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _entry(uri: str, digest: str) -> Any:
    with Client(uri) as c:
        return next(e for e in c.list() if e.digest == digest)


def _as_entry(card: Any) -> CatalogEntry:
    return CatalogEntry(card.header, len(card.to_bytes()), len(card))


def _kept(store: Store, digest: str) -> list[str]:
    folder = store.pieces.folder(digest)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _piece_names(indexes: Any) -> list[str]:
    return sorted(f"{i}.piece" for i in indexes)


def _fetch(s: Side, entry: Any, uri: str) -> Any:
    return swarm_fetch(s.server.swarm, entry, s.connect, locations=[uri], config=SERIAL)


def _kill_after(root: Path, uri: str, digest: str, k: int, tmp_path: Path) -> None:
    """A child process fetches `digest` into `root` and is SIGKILLed once it kept k pieces."""
    marker = tmp_path / f"marker-{k}"
    p = CTX.Process(
        target=swarm_fetch_into, args=(str(root), uri, digest, f"swarm_piece_kept:{k}", str(marker))
    )
    p.start()
    sigkill_at_pause(p, marker, f"keeping {k} pieces")


def test_a_fetch_killed_after_k_pieces_resumes_and_asks_the_peers_only_for_the_rest(
    origin: Any, side: Any, tmp_path: Path
) -> None:
    card, _store, serve = origin
    first = serve()
    root, k = tmp_path / "fetcher", 3
    _kill_after(root, first.location, card.digest, k, tmp_path)
    assert len(set(first.asked)) == k  # one request at a time: it had asked for k pieces
    # the restart: a new Store on the same folder; tmp/ is emptied, the kept pieces stay whole
    s = side()
    assert card.digest not in s.store and not list(s.store.tmp_dir.iterdir())
    assert _kept(s.store, card.digest) == sorted([HEADER_FILE, *_piece_names(first.asked)])
    again = serve()  # a fresh origin server: it counts only what the resumed fetch asks of it
    got = _fetch(s, _entry(again.location, card.digest), again.location)
    assert got.digest == card.digest
    s.store.get(card.digest).verify()
    assert sorted(set(again.asked)) == sorted(set(range(N)) - set(first.asked))  # only the n - k others
    assert again.swarm.status()["served_pieces"] == N - k
    assert s.server.swarm.status()["resumed_pieces"] == k
    assert not s.store.pieces.folder(card.digest).exists()  # gone once the card is stored
    assert not list(s.store.tmp_dir.iterdir())


def _keep(s: Side, entry: Any, card: Any, pieces: Any) -> None:
    """Pieces verified by a fetch that stopped (`close`: they stay kept for the next one)."""
    part = PartialCard(s.store, entry)
    for i in pieces:
        part.add(i, card.batches[i])
    part.close()


def _flip_in_tensor(path: Path, batch: Any) -> None:
    """Flip one byte of `batch`'s tensor values in its piece file."""
    raw = bytearray(path.read_bytes())
    needle = bytes(batch.column("lora_a").values.buffers()[1])[:64]
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 10] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_kept_piece_that_no_longer_verifies_is_deleted_and_fetched_again(
    origin: Any, side: Any, caplog: Any
) -> None:
    card, _store, serve = origin
    srv = serve()
    entry = _entry(srv.location, card.digest)
    s = side()
    _keep(s, entry, card, [0, 1, 2, 4, 5])
    pieces = s.store.pieces
    _flip_in_tensor(pieces.piece_path(card.digest, 1), card.batches[1])  # one flipped byte
    p2 = pieces.piece_path(card.digest, 2)
    p2.write_bytes(p2.read_bytes()[: p2.stat().st_size // 2])  # cut short
    shutil.copyfile(pieces.piece_path(card.digest, 5), pieces.piece_path(card.digest, 4))  # another piece
    with caplog.at_level(logging.WARNING, logger="loraflight.federation.swarm.partial"):
        got = _fetch(s, entry, srv.location)
    assert got.digest == card.digest
    s.store.get(card.digest).verify()
    assert sorted(set(srv.asked)) == [1, 2, 3, 4, 6, 7]  # the three bad ones again, by index
    assert srv.swarm.status()["served_pieces"] == 6
    assert s.server.swarm.status()["resumed_pieces"] == 2
    dropped = sorted(
        int(r.getMessage().split("kept piece ")[1].split()[0])
        for r in caplog.records
        if r.name == "loraflight.federation.swarm.partial" and "kept piece" in r.getMessage()
    )
    assert dropped == [1, 2, 4]
    assert not pieces.folder(card.digest).exists()


def test_resumed_pieces_are_served_and_listed_like_any_verified_piece(origin: Any, side: Any) -> None:
    card, _store, serve = origin
    entry = _entry(serve().location, card.digest)
    s = side()
    _keep(s, entry, card, [1, 3])
    part = PartialCard(s.store, entry)
    assert part.resume() == 2 and part.has() == {1, 3}
    assert s.server.swarm.register(part, fetch=None) is None
    try:
        with Client(s.server.location) as c:
            got = read_pieces(c, piece_ticket(card.digest, 0, N), timeout=10.0, limit=N)
        assert [json.loads(bytes(m))["piece"] for m, _b in got] == [1, 3]
        assert got[1][1].equals(card.batches[3])
        assert s.server.swarm.status()["fetching"][card.digest]["resumed"] == 2
        assert s.server.swarm.listing_holders(card.digest, N) == {s.server.location: "0a"}  # bits 1, 3
    finally:
        s.server.swarm.unregister(card.digest)
        part.close()
    assert _kept(s.store, card.digest) == sorted([HEADER_FILE, "1.piece", "3.piece"])  # close keeps them


def test_a_fetch_that_fails_keeps_its_pieces_and_a_refusal_for_good_deletes_them(
    origin: Any, side: Any
) -> None:
    card, _store, serve = origin
    srv = serve()
    entry = _entry(srv.location, card.digest)
    s = side()
    _keep(s, entry, card, [0, 1])
    # the only holder answers every piece ticket 'busy': the fetch gives up, and may be retried
    srv.swarm.limits = SwarmLimits(max_uploads=0, upload_wait_s=0.0)
    cfg = dataclasses.replace(SERIAL, progress_timeout_s=0.5)
    with pytest.raises(PeerError, match="no piece arrived"):
        swarm_fetch(s.server.swarm, entry, s.connect, locations=[srv.location], config=cfg)
    assert _kept(s.store, card.digest) == sorted([HEADER_FILE, "0.piece", "1.piece"])
    assert s.server.swarm.status()["resumed_pieces"] == 2
    # the resumed pieces were announced: the holder heard of them
    wait_for(lambda: srv.swarm.holders(card.digest).get(s.server.location) == {0, 1}, 10, "the have")
    # another card holds name@version here now: refused by admission, its pieces go
    other = pieced_card(pieces=2, seed=5)
    assert other.ref == card.ref and other.digest != card.digest
    s.store.add(other)
    with pytest.raises(ConflictError, match="already exists here"):
        swarm_fetch(s.server.swarm, entry, s.connect, locations=[srv.location], config=SERIAL)
    assert _kept(s.store, card.digest) == []


def test_a_fetch_refused_at_its_commit_deletes_its_pieces(origin: Any, side: Any) -> None:
    card, _store, serve = origin
    srv = serve()
    entry = _entry(srv.location, card.digest)
    s = side()
    _keep(s, entry, card, range(N))  # every piece kept: the fetch asks for none and commits
    s.store.add(pieced_card(pieces=2, seed=5))  # name@version taken meanwhile (after admission)
    job = SwarmFetch(s.server.swarm, entry, s.connect, holders=[srv.location], config=SERIAL)
    with pytest.raises(ConflictError, match="already exists here"):
        job.run()
    assert srv.asked == [] and s.server.swarm.status()["resumed_pieces"] == N
    assert _kept(s.store, card.digest) == []


def test_a_withdrawal_deletes_the_kept_pieces_of_its_name_and_version(origin: Any, side: Any) -> None:
    card, _store, serve = origin
    entry = _entry(serve().location, card.digest)
    s = side()
    _keep(s, entry, card, [3])
    key, pub = new_signer()
    s.store.trust_add(pub)
    unrelated = pieced_card("unrelated", pieces=2)
    _keep(s, _as_entry(unrelated), unrelated, [0])
    assert s.store.withdraw(new_withdrawal(card.header.name, card.header.version, key)).new
    assert _kept(s.store, card.digest) == []
    assert _kept(s.store, unrelated.digest) == sorted([HEADER_FILE, "0.piece"])


def test_kept_pieces_are_swept_on_open_when_stored_old_broken_or_over_the_cap(tmp_path: Path) -> None:
    root = tmp_path / "swept"
    cards = {n: pieced_card(n, pieces=4, seed=i) for i, n in enumerate(["old", "recent", "stored", "big"])}

    def keep(st: Store, c: Any, pieces: Any) -> None:
        part = PartialCard(st, _as_entry(c))
        for i in pieces:
            part.add(i, c.batches[i])
        part.close()

    with Store(root) as st:
        for name, c in cards.items():
            keep(st, c, range(4) if name == "big" else [0])
        st.add(cards["stored"])  # committed: its pieces are deleted at once
        assert _kept(st, cards["stored"].digest) == []
        keep(st, cards["stored"], [1])  # as if killed between the commit and that delete
        day = time.time() - KEPT_MAX_AGE_S - 3600
        os.utime(st.pieces.folder(cards["old"].digest), (day, day))
        hour = time.time() - 3600  # "big" is the oldest of those young enough to stay
        os.utime(st.pieces.folder(cards["big"].digest), (hour, hour))
        (st.pieces.root / "not-a-digest").mkdir()
        (st.pieces.root / ("ab" * 32)).mkdir()  # a digest's folder without a header
        (st.pieces.folder(cards["recent"].digest) / ".tmp-x").write_bytes(b"half a header")
        kept_bytes = sum(f.stat().st_size for p in st.pieces.root.iterdir() for f in p.iterdir())
    assert kept_bytes > 0
    with Store(root) as st:  # no cap: only the stored, old and broken ones go
        names = {p.name for p in st.pieces.root.iterdir()}
        assert names == {cards["recent"].digest, cards["big"].digest}
        assert _kept(st, cards["recent"].digest) == sorted([HEADER_FILE, "0.piece"])  # the temp file went
        assert sorted(st.pieces.found(cards["recent"].digest, 4)) == [0]
        big = sum(f.stat().st_size for f in st.pieces.folder(cards["big"].digest).iterdir())
    # a store capped so that both kept folders together exceed its share: the oldest goes
    with Store(root, max_bytes=int((big + 1) / KEPT_SHARE)) as st:
        assert {p.name for p in st.pieces.root.iterdir()} == {cards["recent"].digest}
