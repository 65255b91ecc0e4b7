"""The fetch fast paths keep every guarantee: values checked whole-buffer, header reuse only on
identical bytes, the sync report's entries equal the index, concurrent commits all durable."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from loraflight.engine.card import LoRACard
from loraflight.errors import CardError
from loraflight.federation import Client, Store, SyncPolicy, sync
from loraflight.testing import make_card

from .test_hostile import HostileServer, fetch_refused, honest_entry


def _with_nan(card: LoRACard, row: int, column: int) -> LoRACard:
    """`card` with one NaN in `column` (5 = lora_a, 6 = lora_b) of its `row`-th row and a digest
    (format 2: pieces and digest) recomputed to match: only the value check can refuse it."""
    batches, seen = [], 0
    for b in card.batches:
        cols = list(b.columns)
        if seen <= row < seen + b.num_rows:
            arr = cols[column]
            values = arr.values.to_numpy(zero_copy_only=False).copy()
            values[int(arr.offsets[row - seen].as_py())] = np.nan
            cols[column] = pa.ListArray.from_arrays(arr.offsets, pa.array(values, type=arr.type.value_type))
        seen += b.num_rows
        batches.append(pa.record_batch(cols, schema=b.schema))
    bad = LoRACard(card.header, batches)
    return bad.with_header(bad.content_header())


@pytest.mark.parametrize(
    ("nbytes", "modules", "row", "column"),
    [
        (64 * 1024, 2, 1, 6),  # one batch: processed inline at commit
        (9 << 20, 6, 4, 5),  # several batches: checked by the worker while others arrive
    ],
)
def test_nan_with_a_valid_digest_refused(make_store, nbytes, modules, row, column):
    s = make_store()
    s.add(make_card("keep", 1))
    bad = _with_nan(make_card("nan", 1, nbytes=nbytes, modules=modules), row, column)
    assert (len(bad.batches) > 1) == (nbytes > (1 << 20))
    label = "lora_a" if column == 5 else "lora_b"
    fetch_refused(
        s,
        HostileServer(honest_entry(bad), bad.schema, bad.batches),
        CardError,
        f"'layers.{row}.proj': {label} has NaN or Inf",
    )


def test_stream_header_other_than_listed_is_parsed_and_refused(make_store):
    """Header reuse needs byte-identical JSON: a stream whose header differs from the listing
    (same digest claimed) is parsed on its own and fails the digest check."""
    s = make_store()
    real = make_card("skill", 1, nbytes=5 << 20, modules=4)
    other = real.with_header(dataclasses.replace(real.header, description="not what was listed"))
    assert other.schema.metadata != real.schema.metadata and other.digest == real.digest
    fetch_refused(
        s, HostileServer(honest_entry(real), other.schema, other.batches), CardError, "digest mismatch"
    )


def test_sync_report_entries_equal_the_index_and_survive_reopen(make_store, make_server):
    src = make_store("src")
    cards = [make_card(f"c{i:02d}", 1, nbytes=32 * 1024, modules=1, seed=i) for i in range(24)]
    cards.append(make_card("multi", 1, nbytes=9 << 20, modules=6))
    for c in cards:
        src.add(c)
    server = make_server(src)
    dst = make_store("dst")
    report = sync([server.location], SyncPolicy(), dst, concurrency=8)
    assert report.ok and len(report.fetched) == len(cards)
    for e in report.fetched:
        held = dst.entry(e.digest)
        assert held == e and held.locations == e.locations and e.source == server.location
    epochs = sorted(e.epoch for e in report.fetched)
    assert epochs == list(range(1, len(cards) + 1)) and dst.epoch == len(cards)
    root = dst.root
    dst.close()
    with Store(root) as again:  # every commit (and its grouped directory fsync) is on disk
        assert sorted(e.digest for e in again.list()) == sorted(c.digest for c in cards)
        assert again.repair() == {
            "temp_removed": 0,
            "rows_dropped": 0,
            "orphans_indexed": 0,
            "orphans_removed": 0,
        }
        for c in cards:
            got = again.get(c.digest)
            assert got.verify().digest == c.digest


def test_fetch_returns_the_stored_mapped_card(make_store, make_server):
    src = make_store("src")
    card = make_card("multi", 1, nbytes=9 << 20, modules=6)
    src.add(card)
    server = make_server(src)
    dst = make_store("dst")
    with Client(server.location) as c:
        got = c.fetch("multi", store=dst)
    assert got.path == dst.path_of(card.digest) and got.path.exists()
    assert got.verify().digest == card.digest
    assert not list(dst.tmp_dir.iterdir())
