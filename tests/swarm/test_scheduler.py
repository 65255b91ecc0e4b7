"""The pure piece scheduler (federation/swarm/scheduler.py), alone and over a fake network."""

from __future__ import annotations

import random

import pytest

from loraflight.errors import CardError, PeerError
from loraflight.federation.swarm import PieceScheduler, Request, SchedulerConfig
from loraflight.federation.swarm.wire import (
    COMPLETE,
    HaveItem,
    decode_bits,
    encode_bits,
    parse_piece_ticket,
    piece_ticket,
)

D = "ab" * 32


def sched(n: int = 8, **kw: object) -> PieceScheduler:
    cfg = SchedulerConfig(**kw)  # type: ignore[arg-type]
    return PieceScheduler(n, config=cfg, rng=random.Random(7))


def test_rarest_piece_first_and_other_holders_before_the_origin() -> None:
    s = sched(4, total=1)
    s.add_holder("origin", range(4), origin=True)
    s.add_holder("a", [0, 1, 2])
    s.add_holder("b", [0, 1])
    (req,) = s.next_requests(0.0)
    assert req.piece == 3 and req.peer == "origin"  # held by one only: the rarest
    s.finished(req, "ok", 0.1)
    (req,) = s.next_requests(0.2)
    assert req.piece == 2 and req.peer == "a"  # two holders; the origin is not asked when another has it
    s.finished(req, "ok", 0.3)
    seen = set()
    for _ in range(2):
        (req,) = s.next_requests(0.4)
        assert req.peer in ("a", "b")
        seen.add(req.piece)
        s.finished(req, "ok", 0.5)
    assert seen == {0, 1} and s.complete


def test_bounds_per_peer_and_in_total() -> None:
    s = sched(16, per_peer=2, total=5)
    for p in ("a", "b"):
        s.add_holder(p, range(16))
    reqs = s.next_requests(0.0)
    assert len(reqs) == 4  # two holders, two each
    assert all(sum(r.peer == p for r in reqs) == 2 for p in ("a", "b"))
    s.add_holder("c", range(16))
    assert len(s.next_requests(0.0)) == 1  # five in all
    assert len({r.piece for r in reqs}) == 4


def test_a_refused_piece_waits_then_is_asked_as_last_holder_and_a_lie_is_avoided() -> None:
    s = sched(2, total=1, referral_wait_s=1.0)
    s.add_holder("a", [0])
    (req,) = s.next_requests(0.0)
    assert (req.peer, req.piece, req.last) == ("a", 0, False)
    s.finished(req, "missing", 0.1)
    assert s.next_requests(0.5) == []  # not asked again inside the window
    (req,) = s.next_requests(1.2)
    assert req.last  # asked again: it must serve or be avoided
    s.finished(req, "missing", 1.3)
    assert "a" in s.avoided and "piece 0" in s.avoided["a"]
    assert s.unavailable() == [0, 1]


@pytest.mark.parametrize("outcome", ["bad", "stall"])
def test_a_corrupt_or_stalled_piece_is_refused_by_index_and_its_peer_avoided(outcome: str) -> None:
    s = sched(3, total=1)
    s.add_holder("liar", range(3))
    s.add_holder("good", [0])
    s.add_holder("origin", range(3), origin=True)
    # pieces 1 and 2 have two holders (liar, origin): the liar is asked (origins last)
    req = next(r for r in s.next_requests(0.0))
    assert req.peer == "liar"
    s.finished(req, outcome, 0.1, f"piece {req.piece} does not match")
    assert s.bad_pieces == [("liar", req.piece, outcome)]
    assert s.avoided["liar"].startswith(f"piece {req.piece}")
    for t in range(10):
        for r in s.next_requests(1.0 + t):
            assert r.peer != "liar"
            s.finished(r, "ok", 1.0 + t)
    assert s.complete


def test_endgame_duplicates_only_when_every_missing_piece_is_in_flight() -> None:
    s = sched(3, per_peer=4, total=4)
    s.add_holder("a", range(3))
    s.add_holder("b", range(3))
    first = s.next_requests(0.0)
    assert len(first) == 4
    assert sum(r.duplicate for r in first) == 1  # three pieces in flight, then one copy
    dup = next(r for r in first if r.duplicate)
    orig = next(r for r in first if r.piece == dup.piece and not r.duplicate)
    assert dup.peer != orig.peer
    assert s.finished(orig, "ok", 0.1) is True
    assert s.finished(dup, "ok", 0.2) is False  # the second copy brings nothing new


def test_busy_and_errors_back_off_then_avoid() -> None:
    s = sched(2, total=1, retry_after_s=1.0, max_errors=2)
    s.add_holder("a", range(2))
    (req,) = s.next_requests(0.0)
    s.finished(req, "busy", 0.0)
    assert s.next_requests(0.5) == []
    (req,) = s.next_requests(1.0)
    s.finished(req, "error", 1.0)
    (req,) = s.next_requests(2.0)
    s.finished(req, "error", 2.0)
    assert "a" in s.avoided


def test_fake_network_fleet_finishes_from_each_other_when_the_origin_goes() -> None:
    """8 nodes, 16 pieces; each step every request in flight lands. The origin serves 2 at a
    time (busy beyond) and leaves once the fleet holds every piece somewhere; a corrupt peer
    sends bad pieces. Everyone else finishes from each other."""
    n, rng = 16, random.Random(3)
    nodes = [f"n{i}" for i in range(1, 8)]
    corrupt = "n7"
    scheds = {
        p: PieceScheduler(n, config=SchedulerConfig(per_peer=2, total=3), rng=random.Random(i))
        for i, p in enumerate(nodes)
    }
    for s in scheds.values():
        s.add_holder("origin", range(n), origin=True)
    origin_sent = 0
    left_at = None
    done_when_left = 0
    flying: list[tuple[str, Request]] = []
    for step in range(400):
        now = float(step)
        held = set().union(*(s.have for p, s in scheds.items() if p != corrupt))
        if left_at is None and len(held) == n:
            left_at = step
            done_when_left = sum(s.complete for p, s in scheds.items() if p != corrupt)
        origin_up = left_at is None
        # what each node holds is news to the others (a 'have')
        for p, s in scheds.items():
            for q, t in scheds.items():
                if q != p and (t.have or q == corrupt):
                    s.add_holder(q, range(n) if q == corrupt else t.have)
        for p, s in scheds.items():
            if p != corrupt and not s.complete:
                flying += [(p, r) for r in s.next_requests(now)]
        landed, flying = flying, []
        origin_slots = 2
        rng.shuffle(landed)
        for p, r in landed:
            s = scheds[p]
            if r.peer == "origin":
                if not origin_up:
                    s.finished(r, "error", now)
                elif origin_slots == 0:
                    s.finished(r, "busy", now)
                else:
                    origin_slots -= 1
                    origin_sent += 1
                    s.finished(r, "ok", now)
            elif r.peer == corrupt:
                s.finished(r, "bad", now, "digest mismatch")
            elif r.piece in scheds[r.peer].have:
                s.finished(r, "ok", now)
            else:
                s.finished(r, "missing", now)
        if all(s.complete for p, s in scheds.items() if p != corrupt):
            break
    honest = [s for p, s in scheds.items() if p != corrupt]
    assert all(s.complete for s in honest), [len(s.have) for s in honest]
    assert left_at is not None and done_when_left < len(honest)  # the origin left mid-spread
    assert origin_sent <= 1.5 * n  # the rest came from the fleet
    assert sum(len(s.have) for s in honest) == 6 * n
    assert all(corrupt in s.avoided for s in honest if any(b[0] == corrupt for b in s.bad_pieces))
    assert any(s.bad_pieces for s in honest)


def test_wire_forms_round_trip_and_refuse_malformed() -> None:
    assert encode_bits(range(8), 8) == COMPLETE
    bits = encode_bits([0, 9], 12)
    assert bits == "0102" and decode_bits(bits, 12) == {0, 9}
    with pytest.raises(PeerError):
        decode_bits("ff", 4)  # names pieces past the card's 4
    with pytest.raises(PeerError):
        decode_bits("zz", 8)
    t = piece_ticket(D, 3, 2, last=True)
    req = parse_piece_ticket(t)
    assert req is not None and (req.first, req.count, req.last, list(req.indexes)) == (3, 2, True, [3, 4])
    assert parse_piece_ticket(D.encode()) is None
    for bad in (b"pieces:" + D.encode() + b":x:1", b"pieces:" + D.encode() + b":1", b"pieces:zz:0:1"):
        with pytest.raises(CardError):
            parse_piece_ticket(bad)
    item = HaveItem(D, "grpc://10.0.0.1:1", frozenset({1, 2}), 3)
    assert HaveItem.from_dict(item.to_dict()) == item
    with pytest.raises(CardError, match="have body"):
        HaveItem.from_dict({"digest": D, "peer": "nope", "pieces": "00", "count": 3})


def test_the_referral_wait_follows_the_piece_times_seen_within_its_bounds() -> None:
    from loraflight.federation.swarm.fetch import SwarmConfig, referral_wait

    cfg = SwarmConfig(scheduler=SchedulerConfig(referral_wait_s=1.0), referral_pieces=3.0)
    assert referral_wait([], cfg) == 1.0  # nothing seen yet: the configured wait
    assert referral_wait([0.1, 0.2, 0.9], cfg) == pytest.approx(0.6)  # 3 x the median
    assert referral_wait([0.01], cfg) == 0.2  # never below 0.2 s
    assert referral_wait([2.0], cfg) == 1.0  # never above the configured wait
    s = sched(2, referral_wait_s=1.0)
    s.add_holder("a", [0])
    (req,) = s.next_requests(0.0)
    s.finished(req, "missing", 0.0)
    s.referral_wait_s = 0.3
    assert s.next_requests(0.2) == []
    assert s.next_requests(0.31) == [Request("a", 0, last=True)]


def test_an_origin_is_asked_when_no_other_holder_is_free_but_never_as_last_while_one_has_it() -> None:
    s = sched(2, total=2, retry_after_s=1.0, referral_wait_s=0.5)
    s.add_holder("origin", range(2), origin=True)
    s.add_holder("a", [0])
    r1, r2 = s.next_requests(0.0)
    assert {(r1.peer, r1.piece), (r2.peer, r2.piece)} == {("a", 0), ("origin", 1)}
    to_a, to_origin = (r1, r2) if r1.peer == "a" else (r2, r1)
    s.finished(to_origin, "ok", 0.1)
    s.finished(to_a, "busy", 0.1)  # `a` is busy for a second
    (req,) = s.next_requests(0.2)
    assert (req.peer, req.piece, req.last) == ("origin", 0, False)  # a's piece, of the origin meanwhile
    s.finished(req, "missing", 0.3)  # it referred us: the piece went to someone else
    assert s.next_requests(1.0) == []  # past the referral wait, yet `a` is busy: no `last` to the origin
    assert s.next_requests(1.2) == [Request("a", 0)]  # and no endgame copy of it from the origin as `last`


def test_a_cancelled_copy_frees_its_slot_and_leaves_its_holder_in_good_standing() -> None:
    s = sched(1, per_peer=1, total=2, max_errors=1)
    s.add_holder("a", [0])
    s.add_holder("b", [0])
    first, copy = s.next_requests(0.0)
    assert copy.duplicate and {first.peer, copy.peer} == {"a", "b"}
    assert s.finished(first, "ok", 0.1) is True
    assert s.finished(copy, "cancelled", 0.1) is False
    assert s.in_flight() == 0 and s.complete
    assert not s.avoided and not s.busy_until and not s.errors
