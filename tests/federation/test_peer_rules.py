"""Pure rules of "who is a peer" (issue 13): address form, rate limits, the fleet-secret hello,
the peer table's confirmation, caps and mDNS spoofing, and the planner's location and
admitted-version rules. No sockets: fake clocks and scripted probe outcomes."""

from __future__ import annotations

import logging

import pytest

from loraflight.errors import CardError, ConfigError
from loraflight.federation.discovery import Announcement
from loraflight.federation.fleet_auth import (
    FleetSecret,
    ReplayCache,
    answer_proved,
    hello_answer,
    hello_request,
    parse_hello_request,
)
from loraflight.federation.peers import LIVE, MAX_HELLO, MAX_UNCONFIRMED, PeerInfo, PeerTable
from loraflight.federation.protocol import CatalogEntry
from loraflight.federation.ratelimit import RateLimiter, SummaryLog
from loraflight.federation.sync import MAX_LOCATIONS, SyncPolicy, plan_sync
from loraflight.federation.uris import canonical_uri, dial_uri
from loraflight.testing import make_card


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ addresses


def test_uri_variants_of_one_server_have_one_form() -> None:
    variants = [
        "grpc://10.0.0.5:7000",
        "GRPC://10.0.0.5:7000/",
        "grpc://10.0.0.5:7000/x/y?z=1#f",
        "grpc+tcp://10.0.0.5:7000/path",
        "grpc://user@10.0.0.5:7000",
        "10.0.0.5:7000",
    ]
    assert {canonical_uri(v) for v in variants} == {"grpc://10.0.0.5:7000"}
    assert canonical_uri("grpc://Node-A.Example.:9") == "grpc://node-a.example:9"
    assert canonical_uri("grpc+tls://[0:0::1]:5") == "grpc+tls://[::1]:5"
    assert canonical_uri("h:1", tls=True) == "grpc+tls://h:1"


@pytest.mark.parametrize(
    "bad", ["", "http://h:1", "grpc://h", "grpc://h:99999", "grpc://:5", "grpc://h:1\x1b[2J", "grpc://a b:1"]
)
def test_bad_addresses_are_refused_by_name(bad: str) -> None:
    with pytest.raises(ConfigError):
        canonical_uri(bad)


def test_a_tls_node_never_dials_clear_text() -> None:
    assert dial_uri("grpc://10.0.0.5:1/x", tls=True) == "grpc+tls://10.0.0.5:1"
    assert dial_uri("grpc+tls://10.0.0.5:1", tls=True) == "grpc+tls://10.0.0.5:1"
    assert dial_uri("grpc://10.0.0.5:1", tls=False) == "grpc://10.0.0.5:1"


# ------------------------------------------------------------------ rate limits


def test_rate_limiter_per_key_refills_and_stays_bounded() -> None:
    clock = Clock()
    rl = RateLimiter(2.0, 3, max_keys=10, clock=clock)
    assert [rl.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert rl.allow("b")  # another source has its own bucket
    clock.t += 1.0  # two more tokens for "a"
    assert [rl.allow("a") for _ in range(3)] == [True, True, False]
    for i in range(100):  # a flood of sources costs at most max_keys buckets
        rl.allow(f"k{i}")
    assert len(rl) == 10
    with pytest.raises(ValueError):
        RateLimiter(0, 1)


def test_summary_log_writes_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    lg = logging.getLogger("test.summary")
    sl = SummaryLog(lg, 10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "test.summary"):
        for i in range(1000):
            sl.log(logging.WARNING, "flood", "bad thing %d", i)
        assert sl.suppressed("flood") == 999
        clock.t += 10.0
        sl.log(logging.WARNING, "flood", "bad thing %d", 1000)
    lines = [r.getMessage() for r in caplog.records if r.name == "test.summary"]
    assert lines == ["bad thing 0", "bad thing 1000 (999 more like it in the last 10 s)"]


# ------------------------------------------------------------------ the fleet-secret hello


SECRET = FleetSecret(b"fleet-secret-0123456789")
OTHER = FleetSecret(b"another-secret-987654321")


def _exchange(caller: FleetSecret | None, server: FleetSecret | None) -> tuple[bool, bool]:
    """(the server saw the caller prove it, the caller saw the server prove it)."""
    body, nonce = hello_request(caller, node_id="a", peer="grpc://10.0.0.1:1", target="grpc://10.0.0.2:1")
    req = parse_hello_request(body)
    seen = req.proved(server, ReplayCache())
    ans = hello_answer(server, req, node_id="b", extra={"fleet_id": "f"})
    return seen, answer_proved(caller, ans, nonce=nonce, caller_id="a", target="grpc://10.0.0.2:1")


def test_hello_proves_the_secret_both_ways_and_nothing_else() -> None:
    assert _exchange(SECRET, SECRET) == (True, True)
    assert _exchange(SECRET, OTHER) == (False, False)
    assert _exchange(None, SECRET) == (False, False)  # an old or open node: compatible, unconfirmed
    assert _exchange(SECRET, None) == (False, False)


def test_hello_replays_stale_clocks_and_tampering_fail() -> None:
    body, nonce = hello_request(
        SECRET, node_id="a", peer="grpc://10.0.0.1:1", target="grpc://t:1", now=5000.0
    )
    replay = ReplayCache()
    req = parse_hello_request(body)
    assert req.proved(SECRET, replay, now=5001.0)
    assert not parse_hello_request(body).proved(SECRET, replay, now=5001.0)  # the same nonce again
    assert not parse_hello_request(body).proved(SECRET, ReplayCache(), now=5000.0 + 3600)  # stale clock
    for field, value in (("peer", "grpc://evil:1"), ("node_id", "b"), ("target", "grpc://x:1")):
        assert not parse_hello_request({**body, field: value}).proved(SECRET, ReplayCache(), now=5001.0)
    ans = hello_answer(SECRET, req, node_id="b", extra={})
    # an answer to someone else's nonce, or with the server's id changed, proves nothing
    assert not answer_proved(SECRET, ans, nonce="0" * 32, caller_id="a", target="grpc://t:1")
    assert not answer_proved(SECRET, {**ans, "node_id": "c"}, nonce=nonce, caller_id="a", target="grpc://t:1")
    assert not answer_proved(SECRET, {"proof": 5}, nonce=nonce, caller_id="a", target="grpc://t:1")


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"node_id": "a", "nonce": "zz", "time": 1},
        {"node_id": "a" * 500, "nonce": "0" * 32, "time": 1},
        {"node_id": "a", "nonce": "0" * 32, "time": "now"},
        {"node_id": "a", "nonce": "0" * 32, "time": 10**30},
        {"node_id": "a", "nonce": "0" * 32, "time": 1, "proof": "x" * 10},
        {"node_id": "a\x1b[2J", "nonce": "0" * 32, "time": 1},
    ],
)
def test_malformed_hello_bodies_are_refused_by_name(bad: dict) -> None:
    with pytest.raises(CardError, match="hello"):
        parse_hello_request(bad)


def test_fleet_secret_file_rules(tmp_path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(ConfigError, match="at least 16"):
        FleetSecret.from_file(short)
    good = tmp_path / "good"
    good.write_text("# fleet secret\nfleet-secret-0123456789\n")
    s = FleetSecret.from_file(good)
    assert s.value == b"fleet-secret-0123456789" and "0123" not in repr(s)


# ------------------------------------------------------------------ the peer table


def _table(clock: Clock, *, open_fleet: bool = True, events: list | None = None) -> PeerTable:
    return PeerTable(
        self_id="me",
        fleet="f",
        health_interval=1.0,
        probe_interval=5.0,
        failures=3,
        clock=clock,
        open_fleet=open_fleet,
        on_event=(lambda ev, p: events.append((ev, p.key))) if events is not None else None,
    )


def _ann(node: str, uri: str, instance: str | None = None) -> Announcement:
    return Announcement(
        node, "f", "1.0", False, 0, (uri,), instance or f"loraflight-{node}._loraflight._tcp.local."
    )


def _answer(t: PeerTable, clock: Clock, uri: str, info: PeerInfo) -> None:
    """One probe of `uri` answered with `info` (the clock moves past every interval first)."""
    clock.t += 10.0
    for peer, uris in t.due():
        if uri in uris:
            t.record(peer, uri, info)
            return
    raise AssertionError(f"{uri} not due")


def test_who_is_a_confirmed_peer_and_who_is_synced_from() -> None:
    for open_fleet in (True, False):
        clock = Clock()
        t = _table(clock, open_fleet=open_fleet)
        t.set_static("static", ["grpc://10.0.0.1:1"])
        t.announce("added", _ann("m", "grpc://10.0.0.2:1"))
        t.add_address("notify", "grpc://10.0.0.3:1")
        t.add_address("hello", "grpc://10.0.0.4:1")
        _answer(t, clock, "grpc://10.0.0.1:1", PeerInfo("s", "f", 0))
        _answer(t, clock, "grpc://10.0.0.2:1", PeerInfo("m", "f", 0))
        _answer(t, clock, "grpc://10.0.0.3:1", PeerInfo("n", "f", 0))
        _answer(t, clock, "grpc://10.0.0.4:1", PeerInfo("h", "f", 0, proved="secret"))
        assert {p.node_id for p in t.live()} == {"s", "m", "n", "h"}
        assert [p.node_id for p in t.confirmed()] == ["h", "s"]
        # a notify-named host is never a sync source; an mDNS one only in an open fleet
        want = {"s", "h", "m"} if open_fleet else {"s", "h"}
        assert {p.node_id for p in t.syncable()} == want
        assert t.vetted("grpc://10.0.0.1:1/any/path") and t.vetted("grpc+tls://10.0.0.4:1")
        assert not t.vetted("grpc://10.0.0.3:1") and not t.vetted("grpc://10.0.0.2:1")
        assert not t.vetted("grpc://10.9.9.9:1")


def test_a_peer_that_proves_the_secret_later_is_announced_as_confirmed() -> None:
    clock, events = Clock(), []
    t = _table(clock, open_fleet=False, events=events)
    t.announce("added", _ann("m", "grpc://10.0.0.2:1"))
    _answer(t, clock, "grpc://10.0.0.2:1", PeerInfo("m", "f", 0))
    assert t.syncable() == [] and ("confirmed", "m") not in events
    clock.t += 2.0
    _answer(t, clock, "grpc://10.0.0.2:1", PeerInfo("m", "f", 0, proved="secret"))
    assert events[-1] == ("confirmed", "m") and [p.key for p in t.syncable()] == ["m"]
    clock.t += 2.0  # a later answer without the proof takes the confirmation back
    _answer(t, clock, "grpc://10.0.0.2:1", PeerInfo("m", "f", 0))
    assert t.syncable() == []


def test_uri_variants_fold_into_one_unconfirmed_entry_and_the_cap_covers_mdns_too() -> None:
    clock = Clock()
    t = _table(clock)
    for i in range(600):
        t.add_address("notify", f"grpc://10.0.0.5:7000/{i}?x={i}")
    assert len(t.all()) == 1
    for i in range(MAX_UNCONFIRMED + 100):
        t.announce("added", _ann(f"rand-{i}", f"grpc://10.1.{i // 250}.{i % 250}:1"))
    assert len(t.all()) <= MAX_UNCONFIRMED
    t.set_static("static", ["grpc://10.0.0.9:1"])  # configured peers are never crowded out
    assert t.find_uri("grpc://10.0.0.9:1") is not None


def test_a_notify_flood_does_not_crowd_out_addresses_of_proven_hellos() -> None:
    clock = Clock()
    t = _table(clock, open_fleet=False)
    for i in range(MAX_UNCONFIRMED + 50):
        t.add_address("notify", f"grpc://10.1.{i // 250}.{i % 250}:1")
    assert t.add_address("notify", "grpc://10.3.0.1:1") is not None  # the oldest idle claim goes
    assert t.add_address("hello", "grpc://10.2.0.1:1") is not None
    for i in range(MAX_HELLO):
        t.add_address("hello", f"grpc://10.4.{i // 250}.{i % 250}:1")
    assert len([p for p in t.all() if "hello" in p.sources]) <= MAX_HELLO


def test_mdns_goodbye_or_address_change_from_another_record_is_not_taken() -> None:
    clock, events = Clock(), []
    t = _table(clock, events=events)
    real = "grpc://10.0.0.2:1"
    t.announce("added", _ann("p1", real))
    _answer(t, clock, real, PeerInfo("p1", "f", 0))
    # a hostile record claims p1's node id at its own address, then says goodbye
    evil = _ann("p1", "grpc://10.0.0.66:1", instance="loraflight-evil._loraflight._tcp.local.")
    t.announce("added", evil)
    assert t.get("p1").uris == [real] and t.get("p1").state == LIVE
    t.announce("removed", evil)
    assert t.get("p1") is not None and t.get("p1").state == LIVE
    # the same instance name, at another address: an address change is not taken either
    moved = _ann("p1", "grpc://10.0.0.66:1")
    t.announce("updated", moved)
    t.announce("removed", moved)
    assert t.get("p1") is not None and t.get("p1").uris == [real]
    # the claimed address answers as p1: kept apart as a claim, never synced from
    _answer(t, clock, "grpc://10.0.0.66:1", PeerInfo("p1", "f", 0))
    assert t.get("p1").uri == real and [p.node_id for p in t.syncable()] == ["p1"]
    assert ("removed", "p1") not in events
    # the real record's own goodbye still counts
    t.announce("removed", _ann("p1", real))
    assert t.get("p1") is None and events[-1] == ("removed", "p1")


def test_a_peer_that_moved_for_real_is_taken_at_its_new_address() -> None:
    clock = Clock()
    t = _table(clock)
    t.announce("added", _ann("p1", "grpc://10.0.0.2:1"))
    _answer(t, clock, "grpc://10.0.0.2:1", PeerInfo("p1", "f", 0))
    for _ in range(3):  # its old address stops answering: dropped
        clock.t += 1.0
        for peer, _uris in t.due():
            t.record(peer, None, None, "refused")
    assert t.get("p1").state != LIVE
    t.announce("updated", _ann("p1", "grpc://10.0.0.7:1"))
    assert "grpc://10.0.0.7:1" in t.get("p1").uris


# ------------------------------------------------------------------ the planner


def _entry(card, *locs: str) -> CatalogEntry:
    return CatalogEntry(header=card.header, size=1000, rows=len(card), locations=tuple(locs))


def test_listing_locations_are_tried_only_when_vetted_and_a_few() -> None:
    card = make_card("a", 1)
    lister = "grpc://10.0.0.1:1"
    named = [f"grpc://10.9.0.{i}:1" for i in range(20)] + ["grpc://10.0.0.2:1", "grpc://10.0.0.3:1"]
    cats = {lister: [_entry(card, *named)]}
    (f,) = plan_sync([], cats, SyncPolicy())
    assert f.locations == (lister,)  # no vetting rule: the lister only
    vetted = {"grpc://10.0.0.2:1", "grpc://10.0.0.3:1", "grpc://10.0.0.4:1"}.__contains__
    (f,) = plan_sync([], cats, SyncPolicy(), vetted=vetted)
    assert set(f.locations) == {lister, "grpc://10.0.0.2:1", "grpc://10.0.0.3:1"}
    assert len(f.locations) <= MAX_LOCATIONS and lister in f.locations


def test_a_refused_higher_version_never_shadows_an_admitted_lower_one() -> None:
    good = make_card("support-tone", 2)
    planted = make_card("support-tone", 9007199254740991, seed=1)
    cats = {"grpc://p:1": [_entry(good, "grpc://p:1"), _entry(planted, "grpc://p:1")]}
    admits = lambda e: e.version != 9007199254740991  # noqa: E731 (the planted one is refused)
    assert [f.ref for f in plan_sync([], cats, SyncPolicy())] == ["support-tone@9007199254740991"]
    refs = {f.ref for f in plan_sync([], cats, SyncPolicy(), admits=admits)}
    assert refs == {"support-tone@2", "support-tone@9007199254740991"}
    # holding the planted version locally does not stop the admitted one either
    refs = {f.ref for f in plan_sync([_entry(planted)], cats, SyncPolicy(), admits=admits)}
    assert refs == {"support-tone@2"}
    # nor a stranger-signed one of a middle version
    mid = make_card("support-tone", 3, seed=2)
    cats["grpc://p:1"].append(_entry(mid, "grpc://p:1"))
    refs = {f.ref for f in plan_sync([], cats, SyncPolicy(), admits=lambda e: e.version == 2)}
    assert "support-tone@2" in refs


def test_the_fleet_secret_is_never_printed_and_a_bad_file_is_a_config_problem(tmp_path) -> None:
    import json

    from loraflight.federation.cli.node_cmds import redacted_toml
    from loraflight.federation.config import load_config

    f = tmp_path / "fleet.secret"
    f.write_text("fleet-secret-0123456789abcdef\n")
    cfg = load_config(env={}, flags={"fleet_secret_file": str(f), "store": str(tmp_path / "s")})
    for text in (cfg.to_toml(), redacted_toml(cfg), repr(cfg), json.dumps(cfg.to_dict())):
        assert "fleet-secret-0123456789abcdef" not in text
    assert str(f) in cfg.to_toml()
    env = {"LORAFLIGHT_FLEET_SECRET_FILE": str(f)}
    assert load_config(env=env, flags={"store": str(tmp_path / "s")}).fleet_secret_file == str(f)
    short = tmp_path / "short"
    short.write_text("short\n")
    with pytest.raises(ConfigError, match=r"fleet_secret_file.*at least 16"):
        load_config(env={}, flags={"fleet_secret_file": str(short)})
    with pytest.raises(ConfigError, match="fleet_secret_file"):
        load_config(env={}, flags={"fleet_secret_file": str(tmp_path / "missing")})
