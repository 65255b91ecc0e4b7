"""The store's eviction policy as pure functions."""

from __future__ import annotations

from loraflight.federation.store.eviction import choose_victims, is_evictable


def test_only_fetched_unpinned_unpublished_cards_are_evictable() -> None:
    assert is_evictable(pinned=False, published=False, source="grpc://peer:1")
    assert is_evictable(pinned=False, published=False, source="recovered")
    assert not is_evictable(pinned=True, published=False, source="grpc://peer:1")
    assert not is_evictable(pinned=False, published=True, source="grpc://peer:1")
    assert not is_evictable(pinned=False, published=False, source="local")


def test_victims_are_least_recently_used_first_until_the_total_fits() -> None:
    cands = [
        ("old", 40, False, False, "peer"),
        ("pinned", 40, True, False, "peer"),
        ("mid", 40, False, False, "peer"),
        ("new", 40, False, False, "peer"),
    ]
    assert choose_victims(160, 100, cands) == ["old", "mid"]
    assert choose_victims(160, 160, cands) == []
    assert choose_victims(160, 0, cands) == ["old", "mid", "new"]  # all it can, still over
