"""Catching up on many cards (issue 17): bundles (several cards per do_get), group commits,
the card-by-card fallback for peers that do not advertise bundles, and SIGKILL at every new
commit point (whole cards only, an index that matches the files, a restart finishes)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest

from loraflight.errors import CardError, PeerError
from loraflight.federation import CardServer, Client, Store, SyncPolicy, sync
from loraflight.federation.protocol import (
    GET_MANY_KEY,
    MAX_BUNDLE_CARDS,
    advertised_get_many,
    bundle_ticket,
    parse_bundle_ticket,
)
from loraflight.federation.sync import Fetch, plan_bundles
from loraflight.testing import make_card, sigkill_at_pause

from . import _catchup_workers, _workers
from .test_crash import check_consistent

CTX = mp.get_context("spawn")
N_CARDS = 12
PER_BUNDLE = 4


@pytest.fixture
def source(make_store, make_server):
    s = make_store("source")
    cards = [make_card(f"cu-{i:02d}", 1, nbytes=32 << 10, modules=1, seed=i) for i in range(N_CARDS)]
    for c in cards:
        s.add(c)
    return make_server(s), s, {c.digest for c in cards}


# -- protocol (pure)
def test_bundle_ticket_round_trip_and_limits():
    ds = ["a" * 64, "b" * 64, "a" * 64]
    t = bundle_ticket(ds)
    assert t.startswith(b"cards:")
    assert parse_bundle_ticket(t) == ["a" * 64, "b" * 64]  # deduplicated, in order
    assert parse_bundle_ticket(("c" * 64).encode()) is None  # a plain ticket
    with pytest.raises(CardError, match="1 to"):
        bundle_ticket([])
    with pytest.raises(CardError, match="1 to"):
        parse_bundle_ticket(b"cards:" + b",".join([b"d" * 64] * (MAX_BUNDLE_CARDS + 1)))
    with pytest.raises(CardError):
        parse_bundle_ticket(b"cards:not-a-digest")
    assert advertised_get_many({GET_MANY_KEY: 64}) == 64
    assert advertised_get_many({GET_MANY_KEY: 10**9}) == MAX_BUNDLE_CARDS
    for bad in ({}, {GET_MANY_KEY: True}, {GET_MANY_KEY: "64"}, {GET_MANY_KEY: 1}):
        assert advertised_get_many(bad) == 0


def test_plan_bundles_groups_by_location_and_fills_every_slot(source):
    _srv, store, _ = source
    entries = store.list()
    fs = [Fetch(e, ("grpc://a:1" if i % 3 else "grpc://b:2",)) for i, e in enumerate(entries)]
    fs.append(Fetch(entries[0], ("grpc://old:3",)))
    singles, groups = plan_bundles(fs, 2, lambda uri: uri != "grpc://old:3", max_cards=3)
    assert [f.locations[0] for f in singles] == ["grpc://old:3"]
    assert all(len({f.locations[0] for f in g}) == 1 and 1 <= len(g) <= 3 for g in groups)
    assert sorted(f.digest for g in groups for f in g) == sorted(e.digest for e in entries)
    # one card of a location is no bundle; nor is a location that does not serve them
    s2, g2 = plan_bundles(fs[:1], 4, lambda uri: True)
    assert (len(s2), g2) == (1, [])
    s3, g3 = plan_bundles(fs, 4, lambda uri: False)
    assert (len(s3), g3) == (len(fs), [])


# -- bundles end to end
def test_health_advertises_bundles_and_a_bundle_stores_every_card(source, make_store):
    srv, _, digests = source
    dest = make_store("dest")
    epoch0 = dest.epoch
    with Client(srv.location) as c:
        assert c.health()[GET_MANY_KEY] == MAX_BUNDLE_CARDS
        assert c.node_info()[GET_MANY_KEY] == MAX_BUNDLE_CARDS
        got = c.fetch_bundle(c.list(), store=dest)
    assert set(got) == digests and all(e.digest == d for d, e in got.items())
    assert dest.epoch == epoch0 + N_CARDS  # one bump per card, one transaction for the group
    assert check_consistent(dest.root) == digests
    for d in digests:
        assert dest.entry(d).source == srv.location and srv.location in dest.locations(d)


def test_a_bundle_carries_large_cards_in_pieces(make_store, make_server):
    src = make_store("src")
    big = make_card("big", 1, nbytes=9 << 20, modules=3)  # a file over two 4 MiB pieces
    small = make_card("small", 1, nbytes=16 << 10, modules=1)
    src.add(big)
    src.add(small)
    srv = make_server(src)
    dest = make_store("dest")
    rep = sync([srv.location], SyncPolicy(), dest, concurrency=1)
    assert rep.ok and {e.digest for e in rep.fetched} == {big.digest, small.digest}
    assert check_consistent(dest.root) == {big.digest, small.digest}


def test_a_card_gone_from_the_peer_fails_alone(source, make_store):
    srv, store, digests = source
    dest = make_store("dest")
    with Client(srv.location) as c:
        entries = c.list()
        gone = entries[3]
        store.remove(gone.digest)  # after the listing: the bundle says "not held" for it
        got = c.fetch_bundle(entries, store=dest)
    assert isinstance(got[gone.digest], PeerError) and "no longer holds" in str(got[gone.digest])
    assert check_consistent(dest.root) == digests - {gone.digest}


def test_a_corrupt_card_in_a_bundle_is_refused_and_the_rest_commit(source, make_store):
    srv, store, digests = source
    victim = sorted(digests)[5]
    path = store.path_of(victim)
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x40  # one flipped bit in the tensor bytes
    path.write_bytes(bytes(data))
    srv._cache.clear() if hasattr(srv, "_cache") else None
    dest = make_store("dest")
    with Client(srv.location) as c:
        got = c.fetch_bundle(c.list(), store=dest)
    assert isinstance(got[victim], CardError)
    assert check_consistent(dest.root) == digests - {victim}


class OlderServer(CardServer):
    """A node from before bundles: its health names no get_many and it serves digests only."""

    def do_action(self, context, action):
        out = list(super().do_action(context, action))
        if action.type in ("health", "node-info"):
            body = json.loads(out[0])
            body.pop(GET_MANY_KEY, None)
            out = [json.dumps(body).encode()]
        return iter(out)

    def do_get(self, context, ticket):
        if parse_bundle_ticket(ticket.ticket) is not None:
            raise flight.FlightServerError("[lf:card] ticket is not a digest")
        return super().do_get(context, ticket)


@pytest.fixture
def older(source) -> Iterator[OlderServer]:
    _, store, digests = source
    srv = OlderServer(store, node_id="older")
    try:
        yield srv, digests
    finally:
        srv.stop(timeout=5)


def test_a_peer_without_bundles_is_fetched_card_by_card(older, make_store):
    srv, digests = older
    dest = make_store("dest")
    with Client(srv.location) as c:
        assert c.get_many() == 0
        some = c.list()[:3]
        got = c.fetch_bundle(some, store=make_store("direct"))  # one DoGet per card, no bundle ticket
        assert {d for d, e in got.items() if e.digest == d} == {e.digest for e in some}
    rep = sync([srv.location], SyncPolicy(), dest, concurrency=2)
    assert rep.ok, rep.errors
    assert {e.digest for e in rep.fetched} == digests
    assert check_consistent(dest.root) == digests


# -- SIGKILL at the new commit points, then a restart finishes the catch-up
# phase -> cards held after the kill (bundles of 4, one at a time, in name order)
KILL_POINTS = {
    "bundle_after_fsync": 0,  # group 1 fsynced, not renamed: nothing
    "group_renamed:2": 2,  # group 1: two files renamed, index not committed: two re-verified orphans
    "group_before_rename:2": PER_BUNDLE,  # group 1 committed, group 2 not renamed
    "group_before_index_commit:2": 2 * PER_BUNDLE,  # group 2 renamed, not indexed: orphans re-indexed
}


@pytest.mark.slow
def test_sigkill_at_every_group_commit_point_then_restart_finishes(tmp_path, source):
    srv, _, digests = source
    order = sorted(digests, key=lambda d: next(e.name for e in srv.store.list() if e.digest == d))
    for phase, held_after in KILL_POINTS.items():
        root = tmp_path / f"node-{phase.replace(':', '-')}"
        marker = tmp_path / f"marker-{phase.replace(':', '-')}"
        p = CTX.Process(
            target=_catchup_workers.catch_up, args=(str(root), srv.location, phase, str(marker), PER_BUNDLE)
        )
        p.start()
        sigkill_at_pause(p, marker, f"{phase} (syncing node)")
        held = check_consistent(root)  # whole, verified cards only; index == files; tmp/ empty
        assert held == set(order[:held_after]), phase
        # the node restarts and finishes the catch-up
        with Store(root) as s:
            rep = sync([srv.location], SyncPolicy(), s, concurrency=2, bundle_cards=PER_BUNDLE)
            assert rep.ok, rep.errors
            assert len(rep.fetched) == N_CARDS - held_after
        assert check_consistent(root) == digests


def test_sigkill_of_the_serving_node_mid_bundle_fails_over(tmp_path, source, make_store, make_server):
    _, store, digests = source
    backup = make_server(store)
    dying_root = tmp_path / "dying"
    with Store(dying_root) as s:
        for e in store.list():
            s.add(store.get(e.digest))
    port_file, marker = tmp_path / "port", tmp_path / "smarker"
    p = CTX.Process(
        target=_workers.serve, args=(str(dying_root), str(port_file), "serve_bundle_cards:2", str(marker))
    )
    p.start()
    try:
        assert _workers.wait_for_file(port_file, 60, p)
        dying = f"grpc://127.0.0.1:{port_file.read_text()}"
        dest = make_store("dest")
        with Client(dying, timeout=30, retries=0) as c:
            entries = c.list()
        import threading

        out: dict[str, object] = {}

        def run():
            try:
                out["report"] = sync(
                    [dying, backup.location],
                    SyncPolicy(),
                    dest,
                    concurrency=1,
                    catalogs={dying: entries, backup.location: entries},
                    withdrawals=False,
                )
            except Exception as e:  # reported below
                out["error"] = e

        t = threading.Thread(target=run)
        t.start()
        assert _workers.wait_for_file(marker, 60, p), "the serving node never paused mid-bundle"
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        t.join(120)
        assert not t.is_alive() and "error" not in out, out.get("error")
        assert out["report"].ok, out["report"].errors
        assert check_consistent(Path(dest.root)) == digests
    finally:
        if p.is_alive():
            p.kill()
            p.join(10)
