"""The catch-up planner cuts a location's cards into whole rounds of as many bundles as that
location runs at once (min(concurrency, its get_streams)), evenly, within the card and byte
limits: no bundle is left to run alone after the others (pure: no sockets, no files)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from loraflight.federation.protocol import CatalogEntry
from loraflight.federation.sync import BUNDLE_CARDS, Fetch, bundle_sizes, plan_bundles
from loraflight.testing import make_card

MIB = 1 << 20


@pytest.fixture(scope="module")
def header():
    return make_card("plan", 1, nbytes=1 << 10, modules=1).header


def fetches(header, loc: str, n: int, size: int = 1 << 10) -> list[Fetch]:
    """`n` cards of `size` bytes (distinct digests) whose first location is `loc`."""
    out = []
    for i in range(n):
        h = dataclasses.replace(header, name=f"{loc[-1]}-{i:04d}", digest=f"{loc[-1]}{i:063x}")
        out.append(Fetch(CatalogEntry(header=h, size=size, rows=1), (loc,)))
    return out


def by_location(groups: list[list[Fetch]]) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    for g in groups:
        assert len({f.locations[0] for f in g}) == 1, "a bundle mixes locations"
        sizes.setdefault(g[0].locations[0], []).append(len(g))
    return sizes


def test_bundle_sizes_are_whole_rounds_split_evenly() -> None:
    assert bundle_sizes(12, 12 << 10, 3) == [4, 4, 4]
    assert bundle_sizes(12, 12 << 10, 4) == [3, 3, 3, 3]
    many = bundle_sizes(200, 200 * MIB, 3)  # over one round of 3 x 64 cards: two rounds
    assert len(many) == 6 and sum(many) == 200 and max(many) - min(many) <= 1
    capped = bundle_sizes(200, 200 << 10, 3, max_cards=10)
    assert len(capped) % 3 == 0 and max(capped) <= 10 and sum(capped) == 200
    assert max(capped) - min(capped) <= 1
    assert bundle_sizes(4, 4 * 40 * MIB, 3, max_bytes=64 * MIB) == [1, 1, 1, 1]  # one 40 MiB card each
    assert bundle_sizes(2, 2, 3) == [1, 1]  # fewer cards than slots: one card a bundle
    assert bundle_sizes(0, 0, 3) == [] and bundle_sizes(5, 5, 0) == [5]
    assert max(bundle_sizes(1000, 1000, 4)) <= BUNDLE_CARDS


def test_four_threads_and_three_streams_make_three_balanced_bundles_a_round(header) -> None:
    a, b, c, old = "grpc://a:1", "grpc://b:2", "grpc://c:3", "grpc://old:4"
    fs = fetches(header, a, 12) + fetches(header, b, 12) + fetches(header, c, 30) + fetches(header, old, 3)
    streams = {a: 3, b: 0, c: 3}  # b does not say: as many as the sync runs
    singles, groups = plan_bundles(fs, 4, lambda uri: uri != old, streams=streams.__getitem__, max_cards=4)
    assert {f.locations[0] for f in singles} == {old}
    sizes = by_location(groups)
    assert sizes[a] == [4, 4, 4]  # three bundles that run at once, none left for a second round
    assert sizes[b] == [3, 3, 3, 3]
    assert len(sizes[c]) == 9 and max(sizes[c]) <= 4 and max(sizes[c]) - min(sizes[c]) <= 1  # 3 rounds
    assert Counter(f.digest for g in groups for f in g) == Counter(f.digest for f in fs if f not in singles)
    assert all(n == 1 for n in Counter(f.digest for g in groups for f in g).values())
    # more streams than threads: the threads are the limit; no `streams`: as before, `concurrency`
    _, more = plan_bundles(fetches(header, a, 12), 4, lambda uri: True, streams=lambda uri: 16)
    _, unsaid = plan_bundles(fetches(header, a, 12), 4, lambda uri: True)
    assert by_location(more)[a] == by_location(unsaid)[a] == [3, 3, 3, 3]


def test_a_bundle_still_ends_early_at_the_byte_limit(header) -> None:
    loc = "grpc://a:1"
    big = CatalogEntry(header=dataclasses.replace(header, digest="f" * 64), size=60 * MIB, rows=1)
    fs = fetches(header, loc, 6, size=4 * MIB)
    fs.insert(1, Fetch(big, (loc,)))  # with its neighbour it would be over 64 MiB
    _, groups = plan_bundles(fs, 4, lambda uri: True, streams=lambda uri: 3, max_bytes=64 * MIB)
    assert sum(len(g) for g in groups) == len(fs)
    assert all(len(g) == 1 or sum(f.entry.size for f in g) <= 64 * MIB for g in groups)
