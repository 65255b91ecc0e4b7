"""32 concurrent clients against one server in a spawned process; its peak RSS is bounded."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loraflight.federation import Client, Store
from loraflight.testing import make_card

from . import _workers

pytestmark = pytest.mark.slow
CTX = mp.get_context("spawn")
CARD_BYTES = 8 << 20
# gRPC send buffers of the server's max_concurrent_gets (4) streams, about 2 batches of 4 MiB each,
# plus thread stacks and allocator slack: the stated constant.
RSS_CONSTANT = 64 << 20


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_32_concurrent_clients_same_and_different_cards(tmp_path):
    root = tmp_path / "server"
    cards = [make_card(f"load{i}", 1, nbytes=CARD_BYTES, modules=4, seed=i) for i in range(2)]
    with Store(root) as s:
        for c in cards:
            s.add(c)
    largest = max(os.path.getsize(root / "cards" / f"{c.digest}.lora.arrow") for c in cards)
    port_file = tmp_path / "port"
    p = CTX.Process(target=_workers.serve, args=(str(root), str(port_file), None, None, 300.0))
    p.start()
    try:
        assert _workers.wait_for_file(port_file, 60, p)
        uri = f"grpc://127.0.0.1:{port_file.read_text()}"
        with Client(uri) as c:  # warm up: the server has answered one call
            assert len(c.list()) == 2
        base = vm_hwm(p.pid)

        def one(i: int):
            card = cards[i % 2] if i < 16 else cards[0]  # half alternate, half hammer one card
            with Store(tmp_path / f"client-{i}") as st, Client(uri, timeout=120) as c:
                got = c.fetch(card.name, store=st)
                v = got.verify()
                return v.digest == card.digest

        with ThreadPoolExecutor(32) as ex:
            results = list(ex.map(one, range(32)))
        assert all(results) and len(results) == 32
        peak = vm_hwm(p.pid)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    growth = peak - base
    bound = 2 * largest + RSS_CONSTANT
    print(
        f"\nserver VmHWM {base / 2**20:.1f} -> {peak / 2**20:.1f} MiB (growth {growth / 2**20:.1f} MiB, "
        f"bound 2×{largest / 2**20:.1f} + {RSS_CONSTANT / 2**20:.0f} = {bound / 2**20:.1f} MiB)"
    )
    assert growth < bound
