"""Format 2 in a fleet: a store keeps one card of an upgrade pair, nodes say which formats they
read, listings offer a peer only what it reads, and sync counts what it skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.flight as flight
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from loraflight.engine.card import LoRACard
from loraflight.errors import ConflictError
from loraflight.federation import Client, SyncPolicy, sync
from loraflight.federation.protocol import CatalogEntry, Criteria, offer_filter, parse_criteria
from loraflight.federation.security import call_headers
from loraflight.federation.sync import plan_sync
from loraflight.testing import make_card

FIXTURES = Path(__file__).resolve().parents[1] / "engine" / "fixtures"
DOCS_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _entry(card: LoRACard) -> CatalogEntry:
    return CatalogEntry(header=card.header, size=len(card.to_bytes()), rows=len(card))


def test_store_keeps_one_card_of_an_upgrade_pair(make_store) -> None:
    old = LoRACard.open(FIXTURES / "v1-signed.lora.arrow")
    new = old.upgrade(DOCS_KEY)
    s = make_store()
    kept = s.add(old)
    assert s.add(new).digest == kept.digest == old.digest  # not a conflict: the one it has stays
    assert [e.digest for e in s.list()] == [old.digest]
    t = make_store("t")
    assert t.add(new).digest == new.digest
    assert t.add(old).digest == new.digest and len(t) == 1
    with pytest.raises(ConflictError, match="already exists"):
        s.add(old.upgrade(Ed25519PrivateKey.generate()))  # another signer: a conflict as before
    with pytest.raises(ConflictError, match="already exists"):
        s.add(make_card(old.name, old.version))


def test_offer_filter_and_criteria_formats() -> None:
    v2 = make_card("two", 1)
    v1 = LoRACard.open(FIXTURES / "v1-unsigned.lora.arrow")
    entries = [_entry(v1), _entry(v2)]
    out, skipped = offer_filter(entries, (1,))
    assert [e.digest for e in out] == [v1.digest]
    assert skipped == {"format 2 card, the peer reads 1": 1}
    assert offer_filter(entries, (1, 2)) == (entries, {})
    assert parse_criteria(Criteria(formats=(1, 2)).to_json()).formats == (1, 2)
    assert parse_criteria(b"").formats == ()
    for bad in (b'{"formats": "2"}', b'{"formats": [true]}', b'{"formats": [0]}'):
        with pytest.raises(Exception, match="formats"):
            parse_criteria(bad)


def test_sync_plan_skips_the_other_card_of_a_held_pair() -> None:
    old = LoRACard.open(FIXTURES / "v1-signed.lora.arrow")
    new = old.upgrade(DOCS_KEY)
    skipped: dict[str, int] = {}
    assert plan_sync([_entry(old)], {"grpc://p": [_entry(new)]}, SyncPolicy(), skipped) == []
    assert skipped == {"the other card of an upgrade pair is held": 1}
    assert [f.digest for f in plan_sync([], {"grpc://p": [_entry(new)]}, SyncPolicy())] == [new.digest]


def test_nodes_list_formats_and_offer_only_what_a_peer_reads(make_store, make_server) -> None:
    s = make_store()
    v2 = make_card("two", 1)
    v1 = LoRACard.open(FIXTURES / "v1-unsigned.lora.arrow")
    s.add(v2)
    s.add(v1)
    srv = make_server(s)
    with Client(srv.location, retries=0) as c:
        assert c.health()["formats"] == [1, 2]
        assert {e.digest for e in c.list()} == {v1.digest, v2.digest}  # this client reads both
        assert c.node_info()["skipped_offers"] == {}
    # a loraflight peer naming no formats is an older node: it reads format 1 only, and is
    # offered only that; a generic Flight client (no loraflight-protocol header) sees every card
    older = flight.FlightCallOptions(headers=call_headers(None))
    with flight.connect(("127.0.0.1", srv.port)) as raw:
        infos = list(raw.list_flights(b"", options=older))
        assert [json.loads(i.app_metadata)["digest"] for i in infos] == [v1.digest]
        one = list(raw.list_flights(json.dumps({"formats": [1]}).encode(), options=older))
        assert len(one) == 1
        generic = list(raw.list_flights())
        assert {json.loads(i.app_metadata)["digest"] for i in generic} == {v1.digest, v2.digest}
    with Client(srv.location, retries=0) as c:
        info = c.node_info()
    assert info["formats"] == [1, 2]
    assert info["skipped_offers"] == {"format 2 card, the peer reads 1": 2}
    # sync between two new nodes fetches both formats; each verifies on arrival
    t = make_store("t")
    report = sync([srv.location], SyncPolicy(), t)
    assert report.ok and {e.digest for e in report.fetched} == {v1.digest, v2.digest}
    for e in t.list():
        assert t.get(e.digest).verify().digest == e.digest
    assert report.skipped == {}
