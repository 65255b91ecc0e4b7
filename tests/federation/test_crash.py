"""SIGKILL at test-only pause points: the store never holds a partial or unverified card,
reopens consistent, and the next fetch succeeds from another location."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from loraflight.federation import Client, Store
from loraflight.testing import make_card, sigkill_at_pause

from . import _workers

pytestmark = pytest.mark.slow
CTX = mp.get_context("spawn")

WRITER_PHASES = ["stage_batches:1", "stage_batches:2", "after_fsync", "before_rename", "before_index_commit"]
KILLS_PER_PHASE = 4
SERVER_KILLS = 4


def check_consistent(root: Path) -> set[str]:
    """Reopen (repairs) and check every indexed card verifies and files match the index."""
    with Store(root) as s:
        digests = {e.digest for e in s.list()}
        for d in digests:
            s.get(d).verify()
        files = {p.name.split(".")[0] for p in s.cards_dir.iterdir()}
        assert files == digests, (files, digests)
        assert list(s.tmp_dir.iterdir()) == []
    return digests


@pytest.fixture
def source(make_store, make_server):
    s = make_store("source")
    card = make_card("crash", 1, nbytes=10 << 20, modules=6)
    assert len(card.batches) >= 3
    s.add(card)
    return make_server(s), card


def test_sigkill_storing_writer_at_every_phase(tmp_path, source):
    srv, card = source
    kills: Counter[str] = Counter()
    outcomes: dict[str, set[str]] = {}
    for phase in WRITER_PHASES:
        for i in range(KILLS_PER_PHASE):
            root = tmp_path / f"w-{phase.replace(':', '-')}-{i}"
            if i % 2:  # half the runs start from a store that already holds another card
                with Store(root) as s:
                    s.add(make_card("other", 1))
            marker = tmp_path / f"marker-{phase}-{i}"
            p = CTX.Process(
                target=_workers.fetch_into, args=(str(root), srv.location, "crash", phase, str(marker))
            )
            p.start()
            sigkill_at_pause(p, marker, f"{phase} (writer)")
            kills[phase] += 1
            held = check_consistent(root)
            outcomes.setdefault(phase, set()).add("stored" if card.digest in held else "absent")
            # the next fetch succeeds (from the source; the dead writer left nothing in the way)
            with Store(root) as s, Client(srv.location) as c:
                assert c.fetch("crash", store=s).verify().digest == card.digest
    print("\nSIGKILL of a storing writer, per phase:")
    for phase in WRITER_PHASES:
        print(f"  {phase:22s} kills={kills[phase]}  card after restart: {sorted(outcomes[phase])}")
    assert sum(kills.values()) >= 20
    # before the rename nothing may survive; after it the orphan is re-verified and indexed
    for phase in WRITER_PHASES[:-1]:
        assert outcomes[phase] == {"absent"}
    assert outcomes["before_index_commit"] == {"stored"}


def test_sigkill_serving_process_mid_transfer_fails_over(tmp_path, make_store, make_server):
    card = make_card("served", 1, nbytes=10 << 20, modules=6)
    backup_store = make_store("backup")
    backup_store.add(card)
    backup = make_server(backup_store)
    dying_root = tmp_path / "dying"
    with Store(dying_root) as s:
        s.add(card)
    for i in range(SERVER_KILLS):
        port_file, marker = tmp_path / f"port-{i}", tmp_path / f"smarker-{i}"
        p = CTX.Process(
            target=_workers.serve, args=(str(dying_root), str(port_file), "serve_batches:1", str(marker))
        )
        p.start()
        try:
            assert _workers.wait_for_file(port_file, 60, p)
            dying = f"grpc://127.0.0.1:{port_file.read_text()}"
            dest = make_store(f"dest-{i}")
            result: dict[str, object] = {}

            def run(dying=dying, dest=dest, result=result):
                try:
                    with Client(dying, timeout=30, retries=1, backoff=0.05) as c:
                        entry = c.info("served")
                        result["card"] = c.fetch_entry(entry, store=dest, locations=[dying, backup.location])
                except Exception as e:  # reported by the assertion below
                    result["error"] = e

            t = threading.Thread(target=run)
            t.start()
            assert _workers.wait_for_file(marker, 60, p), "server never paused mid-transfer"
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            t.join(120)
            assert not t.is_alive()
            assert "error" not in result, result.get("error")
            got = result["card"]
            assert got.digest == card.digest and dest.entry(card.digest).source == backup.location
            assert check_consistent(dest.root) == {card.digest}
        finally:
            if p.is_alive():
                p.kill()
                p.join(10)
    print(f"\nSIGKILL of the serving process mid-transfer: {SERVER_KILLS} kills, every fetch failed over")
