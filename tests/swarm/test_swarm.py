"""Swarm fetches between real servers on 127.0.0.1: spreading, serving while fetching, and
peers that corrupt, stall or lie about pieces (hostile pyarrow.flight servers written here)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from loraflight.errors import BusyError, PeerError
from loraflight.federation.client import Client
from loraflight.federation.protocol import PROTOCOL_VERSION
from loraflight.federation.server import CardServer
from loraflight.federation.store import Store
from loraflight.federation.swarm import (
    HaveItem,
    PartialCard,
    SchedulerConfig,
    SwarmConfig,
    SwarmFetch,
    SwarmLimits,
    parse_piece_ticket,
    piece_ticket,
    read_pieces,
    swarm_fetch,
    wants_swarm,
)
from loraflight.federation.swarm.wire import piece_metadata
from loraflight.federation.sync import sync
from loraflight.testing import make_card

from .cards import pieced_card

FAST = SwarmConfig(
    scheduler=SchedulerConfig(retry_after_s=0.05, referral_wait_s=0.05),
    piece_timeout_s=1.0,
    idle_timeout_s=1.0,
    fetch_timeout_s=60.0,
)


class Fleet:
    def __init__(self, root: Path, n: int) -> None:
        self.stores = [Store(root / f"s{i}") for i in range(n)]
        self.servers = [CardServer(s) for s in self.stores]
        self.uris = [s.location for s in self.servers]
        for i, s in enumerate(self.servers):
            s.swarm.peer_uris = lambda i=i: [u for j, u in enumerate(self.uris) if j != i]
        self.clients: dict[tuple[int, str], Client] = {}
        self.lock = threading.Lock()

    def connect(self, i: int) -> Any:
        def get(uri: str) -> Client:
            with self.lock:
                c = self.clients.get((i, uri))
                if c is None:
                    c = self.clients[(i, uri)] = Client(uri, timeout=5.0)
                return c

        return get

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for s in self.servers:
            s.stop()
        for s in self.stores:
            s.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    made: list[Fleet] = []

    def make(n: int) -> Fleet:
        made.append(Fleet(tmp_path / f"f{len(made)}", n))
        return made[-1]

    yield make
    for f in made:
        f.close()


def _listed(f: Fleet, i: int = 0) -> Any:
    with Client(f.uris[i]) as c:
        return c.list()[0]


def test_a_card_spreads_from_every_holder_and_the_origin_sends_each_piece_about_once(fleet: Any) -> None:
    f = fleet(5)
    card = pieced_card(pieces=12, piece_bytes=128 << 10)
    f.stores[0].add(card, published=True)
    entry = _listed(f)
    assert wants_swarm(f.servers[1].swarm, entry, [f.uris[0]])
    got: dict[int, Any] = {}
    errors: list[BaseException] = []

    def fetch(i: int) -> None:
        try:
            got[i] = swarm_fetch(f.servers[i].swarm, entry, f.connect(i), locations=[f.uris[0]], config=FAST)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(1, 5):
        assert got[i].digest == card.digest
        f.stores[i].get(card.digest).verify()  # stored whole and verified
        assert not list(f.stores[i].tmp_dir.iterdir())  # no piece file left behind
    sent = [f.servers[i].swarm.status()["pieces_sent"].get(card.digest, 0) for i in range(5)]
    assert sent[0] <= 1.5 * 12, sent  # the origin sent at most 1.5 card sizes
    assert sum(sent[1:]) > 0, sent  # and the fetchers served each other


def test_pieces_as_big_as_a_writers_travel_over_the_data_connection(fleet: Any) -> None:
    # a writer's piece is 4 MiB of tensor bytes: past the control connection's message limit
    f = fleet(3)
    card = pieced_card(pieces=2, piece_bytes=5 << 20)
    f.stores[0].add(card, published=True)
    entry = _listed(f)
    got = swarm_fetch(f.servers[1].swarm, entry, f.connect(1), locations=[f.uris[0]], config=FAST)
    assert got.digest == card.digest
    f.stores[1].get(card.digest).verify()
    assert f.servers[0].swarm.status()["pieces_sent"].get(card.digest, 0) >= 1  # not fetched whole


def test_an_origin_refers_a_piece_it_sent_and_a_copy_serves_it_again(fleet: Any) -> None:
    f = fleet(4)
    card = pieced_card(pieces=3)
    f.stores[0].add(card, published=True)
    entry = _listed(f)
    swarm_fetch(f.servers[1].swarm, entry, f.connect(1), locations=[f.uris[0]], config=FAST)
    ticket = piece_ticket(card.digest, 0, 1)
    for asker in (2, 3):  # the origin sent every piece once: it leaves piece 0 out
        assert read_pieces(f.connect(asker)(f.uris[0]), ticket, timeout=5.0, limit=1) == []
    for asker in (2, 3):  # the copy on server 1 serves it to every asker
        got = read_pieces(f.connect(asker)(f.uris[1]), ticket, timeout=5.0, limit=1)
        assert len(got) == 1 and got[0][1].num_rows == 1
    assert f.servers[1].swarm.status()["referred"] == 0


def test_pieces_are_served_while_fetching_and_partial_holders_travel_with_listings(fleet: Any) -> None:
    f = fleet(2)
    card = pieced_card(pieces=4)
    f.stores[0].add(card, published=True)
    entry = _listed(f)
    part = PartialCard(f.stores[1], entry)
    assert f.servers[1].swarm.register(part, object()) is None
    for i in (1, 3):
        part.add(i, card.batches[i])
    with Client(f.uris[1]) as c:
        got = [
            (json.loads(bytes(m))["piece"], b)
            for m, b in read_pieces(c, piece_ticket(card.digest, 0, 4), timeout=5, limit=5)
        ]
    assert [i for i, _ in got] == [1, 3]  # only the verified pieces it holds
    assert got[0][1].equals(card.batches[1])
    # the origin hears of the partial holder and lists it beside the card
    f.servers[0].swarm.note_have(HaveItem(card.digest, f.uris[1], part.has(), 4))
    listed = _listed(f)
    assert dict(listed.holders) == {f.uris[1]: "0a"}  # bits 1 and 3
    with Client(f.uris[0]) as c:
        assert c.health()["pieces"] == 1
    f.servers[1].swarm.unregister(card.digest)
    part.discard()
    assert not list(f.stores[1].tmp_dir.iterdir())


class Hostile(flight.FlightServerBase):
    """A peer that says it serves pieces and then corrupts, stalls or leaves them out."""

    def __init__(self, card: Any, mode: str, *, pieces: bool = True) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.card, self.mode, self.pieces = card, mode, pieces
        self.tickets: list[bytes] = []
        self.uri = f"grpc://127.0.0.1:{self.port}"

    def do_action(self, context: Any, action: Any) -> Iterator[bytes]:
        body = {"status": "ok", "protocol": PROTOCOL_VERSION, "formats": [1, 2], "epoch": 1}
        if self.pieces:
            body["pieces"] = 1
        return iter([json.dumps(body).encode()])

    def do_get(self, context: Any, ticket: Any) -> Any:
        raw = bytes(ticket.ticket)
        self.tickets.append(raw)
        req = parse_piece_ticket(raw)
        schema = self.card.batches[0].schema
        if req is None:
            return flight.RecordBatchStream(pa.Table.from_batches(self.card.batches))
        mode = self.mode

        def gen() -> Iterator[Any]:
            for i in req.indexes:
                b = self.card.batches[i]
                if mode == "corrupt":
                    a = b.column(5).values.to_numpy().copy()
                    a[0] += 1.0
                    col = pa.ListArray.from_arrays(
                        b.column(5).offsets, pa.array(a), type=b.schema.field(5).type
                    )
                    b = pa.record_batch([*b.columns[:5], col, b.column(6)], schema=b.schema)
                elif mode == "stall":
                    time.sleep(3.0)
                elif mode == "lie":
                    continue
                yield b, pa.py_buffer(piece_metadata(i))

        return flight.GeneratorStream(schema, gen())


@pytest.mark.parametrize("mode", ["corrupt", "stall", "lie"])
def test_a_peer_corrupting_stalling_or_lying_is_refused_by_piece_and_avoided(
    fleet: Any, mode: str, caplog: Any
) -> None:
    f = fleet(2)
    card = pieced_card(pieces=6)
    f.stores[0].add(card, published=True)
    entry = _listed(f)
    bad = Hostile(card, mode)
    try:
        # the hostile peer claims every piece: as a non-origin holder it is asked first
        f.servers[1].swarm.note_have(HaveItem(card.digest, bad.uri, frozenset(range(6)), 6))
        job = SwarmFetch(f.servers[1].swarm, entry, f.connect(1), holders=[f.uris[0]], config=FAST)
        with caplog.at_level("WARNING", logger="loraflight.federation.swarm.fetch"):
            got = job.run()
        assert got.digest == card.digest
        f.stores[1].get(card.digest).verify()
        why = job.avoided[bad.uri]
        asked = {r.first for r in (parse_piece_ticket(t) for t in bad.tickets) if r is not None}
        named = int(why.split(":")[0].removeprefix("piece "))  # refused by piece index
        assert named in asked, (why, asked)
        if mode == "corrupt":
            assert f"digest mismatch: piece {named} of 6" in why
            assert any(f"piece {named} from {bad.uri} refused" in r.message for r in caplog.records)
        # refused for good: asked at most its in-flight bound; a piece left out costs one
        # empty answer, each piece at most once before the peer is asked as the last holder
        assert len(bad.tickets) <= FAST.scheduler.per_peer + (6 if mode == "lie" else 0)
        assert not list(f.stores[1].tmp_dir.iterdir())
    finally:
        bad.shutdown()


def test_old_peers_never_get_a_piece_ticket_and_a_failed_swarm_leaves_nothing(fleet: Any) -> None:
    f = fleet(1)
    card = pieced_card(pieces=3)
    old = Hostile(card, "ok", pieces=False)  # its health has no "pieces": an older node
    stalled = Hostile(card, "stall")
    try:
        with Client(stalled.uri) as c:
            pass
        entry = f.stores[0].add(card)  # only to build a listed entry; then drop it from store 0
        f.stores[0].remove(entry.digest)
        job = SwarmFetch(f.servers[0].swarm, entry, f.connect(0), holders=[old.uri, stalled.uri], config=FAST)
        with pytest.raises(PeerError, match="no usable holder"):
            job.run()
        assert not any(t.startswith(b"pieces:") for t in old.tickets)
        assert (stalled.uri in job.avoided and "stall" in str(job.avoided)) or "timed out" in job.avoided[
            stalled.uri
        ]
        assert f.stores[0].entry(card.digest) is None  # nothing partial in the store
        assert not list(f.stores[0].tmp_dir.iterdir())
        del c
    finally:
        old.shutdown()
        stalled.shutdown()


def test_sync_uses_the_swarm_for_format_2_and_fetches_others_whole(fleet: Any) -> None:
    f = fleet(3)
    big = pieced_card("big", pieces=4)
    small = make_card("small")  # one piece: fetched whole
    for c in (big, small):
        f.stores[0].add(c, published=True)
    assert not wants_swarm(f.servers[1].swarm, _listed_by_name(f, "small"), [f.uris[0]])
    rep = sync([f.uris[0]], None, f.stores[1], swarm=f.servers[1].swarm)
    assert rep.ok, rep.errors
    assert {e.name for e in rep.fetched} == {"big", "small"}
    assert f.servers[0].swarm.status()["pieces_sent"].get(big.digest) == 4
    assert f.stores[1].entry(big.digest) is not None


def _listed_by_name(f: Fleet, name: str) -> Any:
    with Client(f.uris[0]) as c:
        return next(e for e in c.list() if e.name == name)


def test_a_referral_is_answered_at_once_even_when_every_upload_slot_is_taken(fleet: Any) -> None:
    f = fleet(3)
    card = pieced_card(pieces=3)
    f.stores[0].add(card, published=True)
    entry = _listed(f)
    swarm_fetch(f.servers[1].swarm, entry, f.connect(1), locations=[f.uris[0]], config=FAST)
    # no upload slot is ever free on the origin now: a piece it must send is refused as busy
    f.servers[0].swarm.limits = SwarmLimits(max_uploads=0, upload_wait_s=0.0)
    origin = f.connect(2)(f.uris[0])
    assert read_pieces(origin, piece_ticket(card.digest, 0, 1), timeout=5.0, limit=1) == []  # referred
    with pytest.raises(BusyError):  # as its last holder it must send the piece: that needs a slot
        read_pieces(origin, piece_ticket(card.digest, 0, 1, last=True), timeout=5.0, limit=1)


def test_an_origin_sends_a_few_pieces_again_only_after_it_has_sent_every_piece_once(fleet: Any) -> None:
    f = fleet(3)
    card = pieced_card(pieces=4)
    f.stores[0].add(card, published=True)
    f.servers[0].swarm.limits = SwarmLimits(origin_extra=0.5)  # 2 of 4 pieces again
    origin = f.connect(2)(f.uris[0])

    def ask(i: int) -> int:
        return len(read_pieces(origin, piece_ticket(card.digest, i, 1), timeout=5.0, limit=1))

    assert [ask(0), ask(1), ask(0)] == [1, 1, 0]  # piece 0 went out already, pieces 2 and 3 not yet
    assert [ask(2), ask(3)] == [1, 1]
    assert [ask(0), ask(1), ask(2)] == [1, 1, 0]  # every piece went out: two more, then it refers
    assert f.servers[0].swarm.status()["pieces_sent"][card.digest] == 6


def test_a_piece_asked_of_a_fetch_that_commits_meanwhile_comes_from_the_store(fleet: Any) -> None:
    f = fleet(2)
    card = pieced_card(pieces=3)
    entry = f.stores[0].add(card, published=True)
    swarm = f.servers[1].swarm
    partial = PartialCard(f.stores[1], _listed(f))
    assert swarm.register(partial, fetch=None) is None
    partial.add(0, card.batches[0])
    req = parse_piece_ticket(piece_ticket(card.digest, 0, 1))
    assert req is not None
    _schema, stream = swarm.serve(req, "10.0.0.9", f.stores[1].get)  # answered from the partial card
    f.stores[1].add(card)  # the fetch commits and drops its pieces before the stream runs
    partial.discard()
    swarm.unregister(entry.digest)
    sent = list(stream)
    assert len(sent) == 1 and sent[0][0].num_rows == card.batches[0].num_rows


def test_a_fetch_that_gets_no_piece_for_its_progress_timeout_gives_up(fleet: Any) -> None:
    """Holders that answer every piece ticket 'busy' (their upload slots never free) end the swarm
    fetch after `progress_timeout_s` with a clear error (sync then fetches the card whole), not
    after the whole fetch deadline."""
    f = fleet(3)
    card = pieced_card(pieces=3)
    for i in (0, 1):
        f.stores[i].add(card, published=True)
        f.servers[i].swarm.limits = SwarmLimits(max_uploads=0, upload_wait_s=0.0)
    entry = _listed(f)
    cfg = dataclasses.replace(FAST, progress_timeout_s=1.0)
    with pytest.raises(PeerError, match="no piece arrived in 1 s from 2 holders"):  # not "ran past 60 s"
        swarm_fetch(f.servers[2].swarm, entry, f.connect(2), locations=f.uris[:2], config=cfg)
    assert card.digest not in f.stores[2]
