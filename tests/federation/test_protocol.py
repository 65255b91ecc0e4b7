import pytest

from loraflight.errors import AuthError, CardError, CardNotFound, ConflictError, PeerError, TrustError
from loraflight.federation.protocol import (
    CatalogEntry,
    Criteria,
    check_protocol,
    from_flight_error,
    parse_criteria,
    to_flight_error,
)
from loraflight.federation.sync import SyncPolicy, plan_sync
from loraflight.testing import make_card


def test_criteria_round_trip_and_validation():
    c = Criteria(name="sk*", base_model="b", tags=("x", "y"), since=3, limit=5)
    assert parse_criteria(c.to_json()) == c
    assert parse_criteria(b"") == Criteria()
    for bad in (b"[1]", b"{", b'{"since": -1}', b'{"tags": "x"}', b'{"nope": 1}', b'{"digest": "zz"}'):
        with pytest.raises(CardError):
            parse_criteria(bad)
    with pytest.raises(CardError, match="unknown criteria keys"):
        parse_criteria(b'{"nope": 1, "since": "a"}')


def test_protocol_major_mismatch_refused_minor_ok():
    check_protocol("1.7")
    check_protocol(None)
    with pytest.raises(PeerError, match="major versions differ"):
        check_protocol("2.0")
    with pytest.raises(PeerError):
        check_protocol("one")


def test_error_mapping_round_trip():
    import pyarrow.flight as flight

    for exc in (
        CardError("bad card"),
        TrustError("untrusted"),
        ConflictError("conflict"),
        CardNotFound("missing"),
        AuthError("no token (denied)"),
    ):
        fe = to_flight_error(exc, flight)
        assert isinstance(fe, flight.FlightError)
        back = from_flight_error(fe)
        assert type(back) is type(exc) and str(exc) in str(back)
    internal = to_flight_error(RuntimeError("secret /path"), flight)
    assert "secret" not in str(internal)


def entry(card, *locs):
    return CatalogEntry(header=card.header, size=1000, rows=len(card), locations=tuple(locs))


def test_plan_newest_wins_once_and_lineage():
    a1, a2 = make_card("a", 1), make_card("a", 2)
    parent = make_card("base-skill", 1, tags=("other",))
    child = make_card("child", 1, lineage=(parent.digest,))
    b1 = make_card("b", 1, base_model="other-base")
    peers = {
        "grpc://p1:1": [entry(a1, "grpc://p1:1"), entry(a2, "grpc://p1:1"), entry(parent, "grpc://p1:1")],
        "grpc://p2:1": [
            entry(a2, "grpc://p2:1", "grpc://p1:1"),
            entry(child, "grpc://p2:1"),
            entry(b1, "grpc://p2:1"),
        ],
    }
    plan = plan_sync([], peers, SyncPolicy(base_models=("tiny-base",), tags=("demo",)))
    refs = [f.ref for f in plan]
    assert refs.count("a@2") == 1 and "a@1" not in refs and "b@1" not in refs
    assert refs.index("base-skill@1") < refs.index("child@1")  # parent first, despite its tag
    a2f = next(f for f in plan if f.ref == "a@2")
    assert set(a2f.locations) == {"grpc://p1:1", "grpc://p2:1"}
    # nothing to do when everything is local
    assert (
        plan_sync(
            [entry(a2), entry(child), entry(parent)],
            peers,
            SyncPolicy(tags=("demo",), base_models=("tiny-base",)),
        )
        == []
    )
    # a local newer version wins
    assert not [f for f in plan_sync([entry(make_card("a", 3))], peers, SyncPolicy(names=("a",)))]
    # name globs
    assert [f.ref for f in plan_sync([], peers, SyncPolicy(names=("ch*",), include_lineage=False))] == [
        "child@1"
    ]
