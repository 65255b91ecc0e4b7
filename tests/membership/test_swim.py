"""SWIM rules on a simulated fleet: probing, suspicion, refutation, gossip, anti-entropy."""

from __future__ import annotations

import json
import math

import pytest

from loraflight.errors import PeerError
from loraflight.federation.membership import (
    ALIVE,
    DEAD,
    EPOCH,
    LEFT,
    SUSPECT,
    News,
    NewsQueue,
    Swim,
    SwimParams,
    parse_message,
    retransmit_limit,
)
from loraflight.federation.membership.wire import MAX_MEMBERS, MAX_NEWS

from .sim import Fleet


def converged(f: Fleet, state: str, node: str) -> bool:
    return all(f.state(s.self_id, node) == state for s in f.others(node))


def test_fleet_converges_alive_and_stays_so() -> None:
    f = Fleet(8)
    f.introduce_all()
    f.run(20)
    for s in f.nodes.values():
        assert {m.state for m in s.members.values()} == {ALIVE}
        assert len(s.members) == 7
        assert s.refutations == 0


def test_every_member_is_probed_within_bounded_periods() -> None:
    f = Fleet(10)
    f.introduce_all()
    a = f.nodes["n00"]
    seen: set[str] = set()
    bound = 2 * math.ceil(9 / a.params.probes)
    for _ in range(bound):
        seen.update(a.probe_targets())
    assert seen == set(a.members)


@pytest.mark.parametrize("n", [4, 16])
def test_killed_member_is_declared_dead_by_everyone(n: int) -> None:
    f = Fleet(n)
    f.introduce_all()
    f.run(3)
    f.down.add("n01")
    f.run_until(lambda: converged(f, DEAD, "n01"), 60)
    # the suspicion timeout grows with log N
    assert f.nodes["n00"].suspicion_timeout() == pytest.approx(4.0 * max(1.0, math.log10(n - 1)) * 1.0)


def test_suspicion_timeout_grows_with_log_n() -> None:
    small, big = Fleet(4), Fleet(64)
    small.introduce_all()
    big.introduce_all()
    assert big.nodes["n00"].suspicion_timeout() > small.nodes["n00"].suspicion_timeout()


def test_paused_member_is_suspected_then_refutes_and_nobody_declares_it_dead() -> None:
    f = Fleet(6, SwimParams(probe_interval=1.0, suspicion_mult=8.0))
    f.introduce_all()
    f.run(3)
    before = f.nodes["n02"].incarnation
    f.down.add("n02")  # SIGSTOP'd / starved of CPU: answers nothing for a while
    f.run_until(lambda: any(f.state(s.self_id, "n02") == SUSPECT for s in f.others("n02")), 30)
    f.down.discard("n02")
    f.run_until(lambda: converged(f, ALIVE, "n02"), 30)
    me = f.nodes["n02"]
    assert me.incarnation > before and me.refutations >= 1
    assert all(s.members["n02"].incarnation == me.incarnation for s in f.others("n02"))


def test_restarted_member_rejoins_with_a_higher_incarnation() -> None:
    f = Fleet(5)
    f.introduce_all()
    f.run(3)
    f.down.add("n03")
    f.run_until(lambda: converged(f, DEAD, "n03"), 60)
    old = f.nodes["n03"].incarnation
    f.down.discard("n03")
    fresh = f.add("n03", incarnation=old + 10_000)  # boot time in ms: above anything held
    for s in f.others("n03"):
        fresh.offer(s.self_id, s.uri)
    f.run_until(lambda: converged(f, ALIVE, "n03"), 30)
    assert all(s.members["n03"].incarnation == fresh.incarnation for s in f.others("n03"))


def test_partition_heals_and_every_table_converges() -> None:
    f = Fleet(6)
    f.introduce_all()
    f.run(3)
    left, right = ["n00", "n01", "n02"], ["n03", "n04", "n05"]
    f.cut = {frozenset((a, b)) for a in left for b in right}
    f.run_until(lambda: all(f.state(a, b) == DEAD for a in left for b in right), 80)
    f.cut = set()
    # The peer tables see the other side answer again (their dropped-peer probes): offered.
    rejoin = []
    for a in f.nodes.values():
        for b in f.nodes.values():
            if a is not b and a.offer(b.self_id, b.uri):
                rejoin.append((a, b.self_id))
    assert rejoin, "the healed side should be pinged so it can refute"
    for a, b in rejoin:
        f.ping(a, b)
    f.run_until(lambda: all(f.state(a, b) == ALIVE for a in f.nodes for b in f.nodes if a != b), 40)


def test_news_from_an_untrusted_sender_changes_nothing() -> None:
    f = Fleet(4)
    f.introduce_all()
    a = f.nodes["n00"]
    liar = {
        "from": "stranger",
        "inc": 1,
        "uri": "grpc://evil:1",
        "epoch": 99,
        "news": [{"k": DEAD, "n": "n01", "i": 5}, {"k": ALIVE, "n": "n09", "i": 1, "u": "grpc://x:1"}],
    }
    a.receive(parse_message(json.dumps(liar).encode()), trusted=False)
    assert a.members["n01"].state == ALIVE and "n09" not in a.members and "stranger" not in a.members
    a.receive(parse_message(json.dumps(liar).encode()), trusted=True)
    assert a.members["n01"].state == DEAD and "n09" in a.members


def test_an_epoch_reaches_everyone_by_gossip_in_log_n_periods() -> None:
    f = Fleet(16)
    f.introduce_all()
    f.run(2)
    f.nodes["n05"].set_epoch(7)
    took = f.run_until(lambda: all(s.members["n05"].epoch == 7 for s in f.others("n05")), 40)
    assert took <= 4 * math.ceil(math.log2(16))
    heard = [e for s in f.others("n05") for e in s.events if e == (EPOCH, "n05", 7)]
    assert len(heard) == 15  # once per node: deduplicated


def test_generic_items_spread_and_the_highest_version_wins() -> None:
    f = Fleet(8)
    f.introduce_all()
    f.run(2)
    f.nodes["n01"].publish("pieces", "abc", 1, {"have": [0, 1]})
    f.nodes["n01"].publish("pieces", "abc", 2, {"have": [0, 1, 2]})
    f.run_until(
        lambda: all(
            (x := s.items.get(("pieces", "abc"))) is not None and x.number == 2 for s in f.others("n01")
        ),
        40,
    )
    assert f.nodes["n04"].items[("pieces", "abc")].value == {"have": [0, 1, 2]}


def test_leaving_member_is_marked_left_and_never_refutes() -> None:
    f = Fleet(5)
    f.introduce_all()
    f.run(2)
    f.nodes["n02"].leave()
    f.run_until(lambda: converged(f, LEFT, "n02"), 30)
    assert f.nodes["n02"].refutations == 0


def test_anti_entropy_digest_introduces_members_and_epochs() -> None:
    f = Fleet(3)
    a, b = f.nodes["n00"], f.nodes["n01"]
    b.offer("n02", "grpc://n02:1", epoch=4)
    body = {**b.message("n00"), **b.digest()}
    a.receive(parse_message(json.dumps(body).encode()), trusted=True)
    assert a.members["n02"].state == ALIVE and a.members["n02"].epoch == 4


def test_dead_members_are_forgotten_after_reap_time() -> None:
    f = Fleet(3, SwimParams(probe_interval=1.0, reap_after=5.0))
    f.introduce_all()
    f.down.add("n02")
    f.run_until(lambda: converged(f, DEAD, "n02"), 40)
    f.run(10)
    assert "n02" not in f.nodes["n00"].members


def test_news_queue_supersedes_dedupes_and_retransmits_log_n_times() -> None:
    q = NewsQueue(retransmit_mult=2)
    q.add(News(ALIVE, "a", 1, "grpc://a:1"))
    q.add(News(SUSPECT, "a", 1))
    assert [x.kind for x in q.pending()] == [SUSPECT]
    limit = retransmit_limit(2, 16)
    assert limit == 2 * math.ceil(math.log10(17))
    sent = 0
    while q.take(16, 10):
        sent += 1
    assert sent == limit


def test_messages_over_the_bounds_are_refused() -> None:
    base = {"from": "n1", "inc": 1, "uri": "grpc://a:1", "epoch": 0}
    item = {"k": EPOCH, "n": "x", "i": 1}
    with pytest.raises(PeerError, match="news"):
        parse_message(json.dumps({**base, "news": [item] * (MAX_NEWS + 1)}).encode())
    with pytest.raises(PeerError, match="members"):
        parse_message(json.dumps({**base, "members": [["x", "u", 1, ALIVE, 0]] * (MAX_MEMBERS + 1)}).encode())
    with pytest.raises(PeerError, match="'inc'"):
        parse_message(json.dumps({**base, "inc": -1}).encode())
    with pytest.raises(PeerError, match="kind"):
        parse_message(json.dumps({**base, "news": [{"k": "boom", "n": "x", "i": 1}]}).encode())
    with pytest.raises(PeerError, match="'u'"):
        parse_message(json.dumps({**base, "news": [{"k": ALIVE, "n": "x", "i": 1}]}).encode())
    with pytest.raises(PeerError, match="value"):
        big = {"k": "item", "n": "x", "i": 1, "t": "t", "key": "k", "v": "z" * 2000}
        parse_message(json.dumps({**base, "news": [big]}).encode())
    with pytest.raises(Exception, match="limit"):
        parse_message(b"{" + b" " * (70 * 1024) + b"}")


def test_offer_reports_a_member_held_dead_so_the_caller_can_let_it_refute() -> None:
    s = Swim("me", "grpc://me:1", 1, SwimParams())
    assert s.offer("x", "grpc://x:1") is False
    s.members["x"].state = DEAD
    assert s.offer("x", "grpc://x:1") is True
    msg = s.message("x")
    assert msg["news"][0] == {"k": DEAD, "n": "x", "i": 0, "u": "grpc://x:1"}


def test_next_expiry_is_when_the_first_suspicion_runs_out() -> None:
    f = Fleet(4)
    f.introduce_all()
    a = f.nodes["n00"]
    assert a.next_expiry() is None  # nobody suspected: nothing to wake for
    a.probe_failed("n01")
    first = f.clock.now
    f.clock.now += 0.3
    a.probe_failed("n02")
    assert a.next_expiry() == pytest.approx(first + a.suspicion_timeout())
    f.clock.now = first + a.suspicion_timeout()
    a.tick()
    assert a.members["n01"].state == DEAD and a.members["n02"].state == SUSPECT
    assert a.next_expiry() == pytest.approx(first + 0.3 + a.suspicion_timeout())


def test_a_suspicion_travels_with_its_age_so_it_runs_out_everywhere_at_once() -> None:
    f = Fleet(4)
    f.introduce_all()
    a, b = f.nodes["n00"], f.nodes["n02"]
    a.probe_failed("n01")
    f.clock.now += 1.5  # a has held the suspicion 1.5 s when it tells b
    wire = json.loads(json.dumps(a.message("n02")))
    sent = [x for x in wire["news"] if x["k"] == SUSPECT and x["n"] == "n01"]
    assert sent and sent[0]["a"] == 1500
    b.receive(parse_message(json.dumps(wire).encode()), True)
    assert b.members["n01"].state == SUSPECT
    assert b.next_expiry() == pytest.approx(a.next_expiry())
    # an age past the suspicion timeout says no more than "dead now"
    c = f.nodes["n03"]
    wire["news"] = [{**sent[0], "a": 10**12}]
    c.receive(parse_message(json.dumps(wire).encode()), True)
    assert c.next_expiry() == pytest.approx(f.clock.now)


def test_suspicion_age_must_be_a_non_negative_integer() -> None:
    body = {
        "from": "x",
        "inc": 1,
        "uri": "grpc://x:1",
        "epoch": 0,
        "news": [{"k": SUSPECT, "n": "y", "i": 0, "a": -5}],
    }
    with pytest.raises(PeerError, match="'a'"):
        parse_message(json.dumps(body).encode())
