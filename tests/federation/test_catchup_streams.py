"""Catching up runs no more bundles to a peer than the do_get streams it lets one client run
(`get_streams` in its health): a bundle beyond them would wait for a slot on the peer and be
refused as busy after the peer's wait, and its cards would go card by card. Real servers on
127.0.0.1; the peer holds each bundle's slot a while, as on a slow link."""

from __future__ import annotations

import threading
import time
from typing import Any

import pyarrow.flight as flight

from loraflight.federation import CardServer, Client, SyncPolicy, sync
from loraflight.federation.protocol import GET_STREAMS_KEY, parse_bundle_ticket
from loraflight.federation.server import Limits
from loraflight.testing import make_card


class SlowBundles(CardServer):
    """Counts bundle and single do_gets; holds each bundle's slot 0.3 s before streaming."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.bundles = self.singles = self.busy = 0
        self._count = threading.Lock()

    def do_get(self, context: Any, ticket: flight.Ticket) -> Any:
        bundle = parse_bundle_ticket(ticket.ticket) is not None
        try:
            stream = super().do_get(context, ticket)
        except flight.FlightError:
            with self._count:
                self.busy += 1
            raise
        with self._count:
            if bundle:
                self.bundles += 1
            else:
                self.singles += 1
        if bundle:
            time.sleep(0.3)  # the slot is held (a slow link)
        return stream


def test_a_peer_that_allows_one_stream_gets_one_bundle_at_a_time(make_store) -> None:
    src = make_store("src")
    digests = set()
    for i in range(12):
        digests.add(src.add(make_card(f"s-{i:02d}", 1, nbytes=16 << 10, modules=1, seed=i)).digest)
    srv = SlowBundles(src, node_id="src", limits=Limits(gets_per_client=1, get_wait_s=0.05))
    try:
        with Client(srv.location) as c:
            assert c.health()[GET_STREAMS_KEY] == 1 and c.get_streams() == 1
        dst = make_store("dst")
        rep = sync([srv.location], SyncPolicy(), dst, concurrency=4, bundle_cards=3)
        assert rep.errors == {} and {e.digest for e in rep.fetched} == digests
        assert {e.digest for e in dst.list()} == digests
        # four bundles of three cards, one after another: none refused as busy, none card by card
        assert (srv.bundles, srv.singles, srv.busy) == (4, 0, 0)
    finally:
        srv.stop(timeout=10)


def _catch_up(make_store, cards: int, **kw: Any) -> SlowBundles:
    """A peer that lets one client run 3 streams; `cards` cards caught up from it with 4 threads."""
    src = make_store("src")
    digests = set()
    for i in range(cards):
        digests.add(src.add(make_card(f"s-{i:02d}", 1, nbytes=16 << 10, modules=1, seed=i)).digest)
    srv = SlowBundles(src, node_id="src", limits=Limits(gets_per_client=3, get_wait_s=0.05))
    try:
        with Client(srv.location) as c:
            assert c.get_streams() == 3
        dst = make_store("dst")
        rep = sync([srv.location], SyncPolicy(), dst, concurrency=4, **kw)
        assert rep.errors == {} and {e.digest for e in rep.fetched} == digests
        assert {e.digest for e in dst.list()} == digests
        return srv
    finally:
        srv.stop(timeout=10)


def test_four_threads_and_three_streams_fetch_in_three_bundles_at_once(make_store) -> None:
    srv = _catch_up(make_store, 12)
    # three bundles of four cards that run together; not four of three, the fourth left alone
    assert (srv.bundles, srv.singles, srv.busy) == (3, 0, 0)


def test_rounds_of_bundles_are_whole_multiples_of_the_streams(make_store) -> None:
    srv = _catch_up(make_store, 18, bundle_cards=4)
    # 18 cards, at most 4 a bundle: two rounds of three bundles of three (not 4+4+4+4+2)
    assert (srv.bundles, srv.singles, srv.busy) == (6, 0, 0)
