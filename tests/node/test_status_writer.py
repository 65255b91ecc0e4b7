"""The status file is rewritten after changes, coalesced (`StatusWriter`): a burst of changes
costs one or two writes, the last change is always written within the delay, start and stop
write at once. Real files; the writer counts the real writes it makes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from loraflight.errors import ConfigError
from loraflight.federation.node import Node
from loraflight.federation.node.status import STATUS_DELAY, StatusWriter, write_due, write_status_file
from loraflight.testing import node_config, tiny_card, wait_for


class Counter:
    """A state the status file shows (`n`), written by a real `write_status_file`; counts writes.
    While `gate` is clear a write waits for it (at most 10 s) before it reads the state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.n = 0
        self.writes = 0
        self.fail = 0  # the next this many writes raise OSError
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def write(self) -> None:
        self.gate.wait(10)
        with self._lock:
            self.writes += 1
            if self.fail:
                self.fail -= 1
                raise OSError("disk full (test)")
            n = self.n
        write_status_file(self.path, {"n": n})

    def change(self, w: StatusWriter, n: int, what: str) -> None:
        """Set the state to `n`, poke `w`, and wait (10 delays at most) until the file shows it."""
        self.n = n
        w.poke()
        wait_for(lambda: self.shown() == n, timeout=10 * w.delay, what=what)

    def shown(self) -> int | None:
        try:
            return int(json.loads(self.path.read_text())["n"])
        except (OSError, ValueError):
            return None


def test_write_due_is_at_once_after_quiet_and_one_delay_after_the_last_write() -> None:
    assert write_due(None, None, 0.5) is None  # nothing changed: no write
    assert write_due(None, 10.0, 0.5) is None
    assert write_due(3.0, None, 0.5) == 3.0  # never written: at once
    assert write_due(20.0, 10.0, 0.5) == 20.0  # quiet for longer than the delay: at once
    assert write_due(10.1, 10.0, 0.5) == 10.5  # in a burst: one delay after the last write
    with pytest.raises(ConfigError, match="positive"):
        StatusWriter(lambda: None, delay=0)


def test_a_burst_of_changes_is_one_or_two_writes_and_ends_with_the_latest_state(tmp_path: Path) -> None:
    c = Counter(tmp_path / "status.json")
    w = StatusWriter(c.write, delay=0.2)
    w.start()
    try:
        assert (c.writes, c.shown()) == (1, 0)  # start writes in the caller's thread
        c.gate.clear()  # a write that begins during the burst waits for its end
        for i in range(1, 201):
            c.n = i
            w.poke()
        c.gate.set()
        wait_for(lambda: c.shown() == 200, timeout=10 * w.delay, what="the state after the burst written")
        assert c.writes - 1 <= 2, f"{c.writes - 1} writes for a burst of 200 changes"
    finally:
        w.close()
    assert c.shown() == 200


def test_a_single_change_is_written_within_the_delay(tmp_path: Path) -> None:
    c = Counter(tmp_path / "status.json")
    w = StatusWriter(c.write)
    assert w.delay == STATUS_DELAY
    w.start()
    try:
        c.change(w, 7, "one change written")
        c.change(w, 8, "a change right after a write")  # the trailing write carries it
    finally:
        w.close()


def test_a_failed_write_is_written_again_at_the_next_change(tmp_path: Path) -> None:
    c = Counter(tmp_path / "status.json")
    w = StatusWriter(c.write, delay=0.05)
    w.start()
    try:
        c.n, c.fail = 1, 1
        w.poke()
        wait_for(lambda: c.writes == 2, timeout=10 * w.delay, what="the failing write")
        assert c.shown() == 0 and not c.fail
        c.change(w, 1, "the state written after a failure")
    finally:
        w.close()


def test_close_writes_the_final_state_at_once_and_later_changes_write_nothing(tmp_path: Path) -> None:
    c = Counter(tmp_path / "status.json")
    w = StatusWriter(c.write, delay=30.0)  # a coalesced write would not come in this test's time
    w.close()  # never started: nothing to write
    assert c.writes == 0 and c.shown() is None
    w.start()
    c.n = 5
    w.poke()  # due in 30 s: close must not wait for it, nor lose it
    w.close()
    assert (c.writes, c.shown()) == (2, 5)
    assert not [t for t in threading.enumerate() if t.name == "lf-status"]
    c.n = 6
    w.poke()  # closed: ignored
    assert (c.writes, c.shown()) == (2, 5)
    w.start()  # a node started again writes again
    try:
        assert (c.writes, c.shown()) == (3, 6)
    finally:
        w.close()


def test_node_writes_status_at_start_after_changes_and_at_stop(tmp_path: Path, fleet: str, signer) -> None:
    key, pub = signer
    path = tmp_path / "status.json"
    cfg = node_config(
        tmp_path / "n", fleet, **{"discovery.enabled": False, "trust.keys": [pub], "status_file": str(path)}
    )

    def refs() -> list[str]:
        return [c["ref"] for c in json.loads(path.read_text())["cards"]]

    n = Node(cfg).start()
    try:
        assert json.loads(path.read_text())["node_id"] == n.node_id and refs() == []  # written by start()
        n.store.add(tiny_card("one", 1, key=key), published=True)
        wait_for(lambda: refs() == ["one@1"], timeout=30, what="the status file to list the new card")
        n.store.add(tiny_card("two", 1, key=key), published=True)
    finally:
        n.stop()
    assert sorted(refs()) == ["one@1", "two@1"]  # stop() wrote the final state before it returned
