"""The kept helper threads that hash pieces (engine/card/helpers.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from loraflight.engine.card import LoRACard, ModuleLoRA
from loraflight.engine.card.helpers import LIMIT, POOL, HelperPool
from loraflight.errors import CardError


def _wait_all(events: list[threading.Event]) -> None:
    for e in events:
        assert e.wait(10), "a submitted task never ran"


def test_every_task_runs_and_threads_are_kept_between_jobs() -> None:
    pool = HelperPool(limit=3)
    seen: set[int] = set()
    lock = threading.Lock()

    def task(done: threading.Event) -> None:
        with lock:
            seen.add(threading.get_ident())
        done.set()

    for _ in range(5):  # five jobs one after the other: the same kept thread serves them all
        done = threading.Event()
        pool.submit(task, done)
        _wait_all([done])
    assert pool.threads == 1
    assert len(seen) == 1


def test_threads_grow_to_the_limit_and_further_tasks_wait_for_them() -> None:
    pool = HelperPool(limit=2)
    release = threading.Event()
    running = threading.Semaphore(0)
    done = [threading.Event() for _ in range(6)]

    def blocked(i: int) -> None:
        running.release()
        release.wait(10)
        done[i].set()

    for i in range(6):
        pool.submit(blocked, i)
    assert running.acquire(timeout=10) and running.acquire(timeout=10)
    assert pool.threads == 2  # never more than the limit, however many tasks wait
    assert not any(d.is_set() for d in done)
    release.set()
    _wait_all(done)  # the queued tasks ran on the two kept threads
    assert pool.threads == 2


def test_a_failing_task_is_logged_and_the_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = HelperPool(limit=1)
    done = threading.Event()

    def bad() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="loraflight.card"):
        pool.submit(bad)
        pool.submit(done.set)
        _wait_all([done])
    assert pool.threads == 1
    assert any("hashing helper task failed" in r.getMessage() for r in caplog.records)


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        HelperPool(limit=0)


def _card(tmp_path: object, pieces: int) -> LoRACard:
    rng = np.random.default_rng(3)
    mods = []
    for i in range(pieces * 4):  # 4 rows of 1 MiB (A + B) per 4 MiB piece
        a = (rng.standard_normal((16, 16384)) * 0.02).astype(np.float16)
        b = (rng.standard_normal((16384, 16)) * 0.02).astype(np.float16)
        mods.append(ModuleLoRA(f"model.layers.{i}.q_proj", 16, 32.0, a, b))
    card = LoRACard.build(mods, name="pooled")
    assert len(card.header.pieces) == pieces
    return LoRACard.open(card.write(os.path.join(str(tmp_path), "pooled.lora.arrow")))


def test_verify_runs_its_helpers_on_kept_threads(tmp_path: object) -> None:
    card = _card(tmp_path, 4)
    for _ in range(20):
        card.verify()
    # a helper still finishing a piece the caller took over may make the next job start a
    # second thread, but never one per verify: the kept threads stay within the pool's limit
    assert 1 <= POOL.threads <= min(LIMIT, 19) or (os.cpu_count() or 1) == 1


def test_a_flipped_byte_is_still_found_with_kept_threads(tmp_path: object) -> None:
    card = _card(tmp_path, 4)
    path = card.path
    assert path is not None
    raw = bytearray(path.read_bytes())
    run = card.runs[2]
    raw[run.flat_b.ctypes.data - card.mapping.address + 77] ^= 0x04  # type: ignore[union-attr]
    del card, run
    bad = path.with_name("flipped.lora.arrow")
    bad.write_bytes(bytes(raw))
    for _ in range(3):
        with pytest.raises(CardError, match="piece 2 of 4"):
            LoRACard.open(bad).verify()


def test_a_forked_child_makes_its_own_helpers(tmp_path: object) -> None:
    """After fork() the child has none of the parent's threads: its pool starts empty and
    verifying there still works (no task waits for a thread that does not exist)."""
    card = _card(tmp_path, 4)
    card.verify()  # the parent's pool has threads now
    code = (
        "import os, sys\n"
        "from loraflight.engine.card import LoRACard\n"
        "from loraflight.engine.card.helpers import POOL\n"
        f"card = LoRACard.open({str(card.path)!r})\n"
        "card.verify()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ok = POOL.threads == 0\n"
        "    try:\n"
        "        card.verify(); card.verify()\n"
        "    except Exception:\n"
        "        ok = False\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
