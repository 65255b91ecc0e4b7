"""Servers on 127.0.0.1:0 with real clients: three-node sync, generic Flight client, errors."""

import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from loraflight.errors import AuthError, CardError, CardNotFound, ConflictError, PeerError
from loraflight.federation import Client, SyncPolicy, sync
from loraflight.testing import make_card


def snapshot(store):
    return (
        store.epoch,
        sorted(e.digest for e in store.list()),
        sorted(p.name for p in store.cards_dir.iterdir()),
    )


def test_three_nodes_publish_sync_chain(make_store, make_server, capsys):
    sa, sb, sc = make_store("a"), make_store("b"), make_store("c")
    A = make_server(sa, write_tokens=["wa"])
    B = make_server(sb)
    C = make_server(sc)
    v1 = make_card("skill", 1, nbytes=6 << 20, modules=6)
    with Client(A.location, token="wa") as ca:
        assert ca.publish(v1) == v1.digest
    rb = sync([A.location], SyncPolicy(tags=("demo",)), sb)
    assert rb.ok and [e.ref for e in rb.fetched] == ["skill@1"]
    rc = sync([B.location], SyncPolicy(), sc)
    assert rc.ok and [e.ref for e in rc.fetched] == ["skill@1"]
    with Client(C.location) as cc:
        (entry,) = cc.list()
    assert entry.digest == v1.digest
    assert entry.locations[0] == C.location
    assert {A.location, B.location} <= set(entry.locations)
    # the CLI's ls shows the same
    from loraflight.federation.cli import main

    assert main(["ls", C.location, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "skill" and {A.location, B.location, C.location} <= set(
        listed[0]["locations"]
    )
    # a second sync fetches nothing
    again = sync([B.location], SyncPolicy(), sc)
    assert again.ok and again.fetched == [] and again.planned == []
    # a newer version on A reaches C by the next round
    v2 = make_card("skill", 2, nbytes=1 << 20)
    with Client(A.location, token="wa") as ca:
        ca.publish(v2)
    assert [e.ref for e in sync([A.location], SyncPolicy(), sb).fetched] == ["skill@2"]
    assert [e.ref for e in sync([B.location], SyncPolicy(), sc).fetched] == ["skill@2"]
    assert sc.find("skill").digest == v2.digest
    sc.get(v2.digest).verify()


def test_generic_flight_client_lists_reads_header_and_gets(make_store, make_server):
    s = make_store()
    card = make_card("generic", 3, nbytes=9 << 20, modules=5)
    e = s.add(card)
    srv = make_server(s)
    with flight.connect(("127.0.0.1", srv.port)) as c:
        infos = list(c.list_flights())  # a generic client names no formats: it is offered every card
        assert len(infos) == 1
        header = json.loads(infos[0].app_metadata)
        assert header["name"] == "generic" and header["digest"] == card.digest
        assert [p.decode() for p in infos[0].descriptor.path] == ["generic", "3"]
        table = c.do_get(infos[0].endpoints[0].ticket).read_all()
        info = c.get_flight_info(flight.FlightDescriptor.for_path("generic", "latest"))
        assert info.total_records == len(card)
        schema = c.get_schema(flight.FlightDescriptor.for_path("generic", "3")).schema
        actions = {a.type for a in c.list_actions()}
        health = json.loads(next(iter(c.do_action(flight.Action("health", b"")))).body.to_pybytes())
    with pa.memory_map(str(s.path_of(e.digest))) as mm:
        expected = pa.ipc.open_file(mm).read_all()
        assert table.equals(expected, check_metadata=True)
    assert schema.equals(expected.schema, check_metadata=True)
    assert {"health", "node-info", "notify", "delete"} <= actions
    assert health["status"] == "ok" and health["protocol"] == "1.0"


def test_node_info_notify_delete_and_errors(make_store, make_server, tmp_path):
    s = make_store()
    notified = []
    srv = make_server(s, write_tokens=["w"], fleet_id="f1", on_notify=notified.append)
    with Client(srv.location, token="w", retries=0) as c:
        c.publish(make_card("x", 1))
        info = c.node_info()
        assert info["fleet_id"] == "f1" and info["cards"] == 1 and info["epoch"] == 1
        assert c.notify("grpc://10.0.0.1:1234", 7)["ok"]
        assert notified == ["grpc://10.0.0.1:1234"]
        with pytest.raises(CardError, match="notify body"):
            c.notify("not a uri", 1)
        with pytest.raises(CardNotFound):
            c.info("nope")
        with pytest.raises(CardNotFound):
            c.fetch("x", 9)
        with pytest.raises(ConflictError):
            c.publish(make_card("x", 1, seed=5))
        # a hostile name never reaches the server: the card cannot even be built; a raw
        # descriptor with one is refused by the server with the reason
        with (
            flight.connect(("127.0.0.1", srv.port)) as raw,
            pytest.raises(flight.FlightServerError, match="could escape"),
        ):
            raw.get_flight_info(flight.FlightDescriptor.for_path("../../etc", "1"))
        # a do_put whose header names an escaping path is refused before any byte is stored
        card = make_card("ok", 1)
        bad = card.header.to_dict() | {"name": "../../evil"}
        schema = card.schema.with_metadata({b"loraflight": json.dumps(bad).encode()})
        with flight.connect(("127.0.0.1", srv.port)) as raw:
            opts = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer w")])
            w, _ = raw.do_put(flight.FlightDescriptor.for_path("x", "1"), schema, opts)
            with pytest.raises(flight.FlightError, match="escape"):
                w.write_batch(pa.record_batch(card.batches[0].columns, schema=schema))
                w.close()
        assert [e.ref for e in s.list()] == ["x@1"] and list(s.tmp_dir.iterdir()) == []
        assert c.delete(name="x")["ref"] == "x@1"
        assert len(s) == 0
    with Client(srv.location, retries=0) as ro, pytest.raises(AuthError):
        ro.delete(name="x")


def test_protocol_major_mismatch_refused_by_server(make_store, make_server):
    srv = make_server(make_store())
    with flight.connect(("127.0.0.1", srv.port)) as c:
        opts = flight.FlightCallOptions(headers=[(b"loraflight-protocol", b"2.0")])
        with pytest.raises(flight.FlightError, match="major versions differ"):
            list(c.list_flights(b"", opts))
    with Client(srv.location) as ok:
        assert ok.health()["protocol"].startswith("1.")


def test_failover_to_next_location(make_store, make_server):
    sa, sb = make_store("a"), make_store("b")
    card = make_card("f", 1)
    sa.add(card)
    A = make_server(sa)
    dead = "grpc://127.0.0.1:9"  # discard port: nothing listens
    with Client(A.location, retries=0, timeout=5) as c:
        entry = c.info("f")
        got = c.fetch_entry(entry, store=sb, locations=[dead, A.location])
    assert got.digest == card.digest and sb.entry(card.digest).source == A.location


def test_fetch_without_store_returns_verified_card(make_store, make_server):
    s = make_store()
    card = make_card("m", 1, nbytes=5 << 20, modules=3)
    s.add(card)
    srv = make_server(s)
    with Client(srv.location) as c:
        got = c.fetch("m")
    assert got.digest == card.digest and got.verify().digest == card.digest


def test_unreachable_peer_is_a_peer_error(make_store):
    with Client("grpc://127.0.0.1:9", timeout=2, retries=1, backoff=0.01) as c, pytest.raises(PeerError):
        c.health()


def test_catalog_entries_per_peer_bounded(make_store, make_server):
    s = make_store()
    for i in range(3):
        s.add(make_card(f"c{i}", 1))
    srv = make_server(s)
    with Client(srv.location, max_entries=2) as c, pytest.raises(PeerError, match="more than 2 cards"):
        c.list()
    with Client(srv.location) as c:
        assert len(c.list(limit=2)) == 2 and len(c.list(since=2)) == 1
