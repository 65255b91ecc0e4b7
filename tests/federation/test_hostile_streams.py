"""Slow, endless and huge: hostile readers, peers and writers written here (pyarrow.flight).

Every hostile stream stops at 64 MiB, memory is read as a subprocess's VmHWM, every wait is
bounded, so these tests are safe (and fail, not hang) on code without the limits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from loraflight.errors import BusyError, PeerError
from loraflight.federation import Client
from loraflight.federation.protocol import CatalogEntry, entry_to_flight_info
from loraflight.federation.server import Limits
from loraflight.testing import make_card, wait_for

CAP = 64 << 20  # no hostile stream here sends more


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads")


def big_card(name="big", version=1):
    return make_card(name, version, nbytes=48 << 20, modules=12)  # 12 batches of 4 MiB


def stall_readers(uri: str, digest: str, n: int, token: str | None = None) -> list:
    """`n` streams that read one message and then stop reading (kept open)."""
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())] if token else [])
    held = []
    for _ in range(n):
        c = flight.FlightClient(uri)
        r = c.do_get(flight.Ticket(digest.encode()), opts)
        r.read_chunk()
        held.append((c, r))
    return held


def release(held) -> None:
    for c, r in held:
        with contextlib.suppress(Exception):
            r.cancel()
        c.close()


# ------------------------------------------------------------------ DoGet slots


def test_stalled_readers_give_their_slots_back_and_a_real_fetch_gets_through(make_store, make_server):
    src = make_store("src")
    card = big_card()
    src.add(card, published=True)
    limits = Limits(max_concurrent_gets=4, gets_per_client=4, get_wait_s=8.0, stall_s=1.0)
    server = make_server(src, limits=limits)
    held = stall_readers(server.location, card.digest, 4)  # anonymous, same address as the fetch
    try:
        with Client(server.location, retries=0, timeout=20) as c:
            got = c.fetch("big", 1, store=make_store("dst"))
        assert got.digest == card.digest
    finally:
        release(held)


def test_per_client_limit_keeps_slots_for_other_clients(make_store, make_server):
    src = make_store("src")
    card = big_card()
    src.add(card, published=True)
    limits = Limits(max_concurrent_gets=4, gets_per_client=2, get_wait_s=2.0, stall_s=120.0)
    server = make_server(src, limits=limits, read_tokens=["tok-hostile", "tok-real"])
    held = stall_readers(server.location, card.digest, 2, token="tok-hostile")
    try:
        # a third stream of the same client waits for its own slot, then is refused by name
        with (
            Client(server.location, token="tok-hostile", retries=0, timeout=20) as c,
            pytest.raises(PeerError, match="per-client limit"),
        ):
            c.fetch("big", 1)
        with Client(server.location, token="tok-real", retries=0, timeout=20) as c:
            assert c.fetch("big", 1, store=make_store("dst")).digest == card.digest
    finally:
        release(held)


def test_stream_slot_rules():
    from loraflight.federation.limits import StreamSlots, client_key

    assert client_key("ipv4:10.0.0.7:51234", None) == client_key("ipv4:10.0.0.7:6000", None)
    assert client_key("ipv6:[fe80::1]:51234", None) == "addr:fe80::1"
    assert client_key("ipv4:10.0.0.7:1", "Bearer a") != client_key("ipv4:10.0.0.7:1", "Bearer b")
    assert client_key("ipv4:10.0.0.7:1", "Bearer a") == client_key("ipv4:10.0.0.8:1", "Bearer a")
    pool = StreamSlots("t", total=2, per_client=1, idle_s=5.0, max_open=3)
    a = pool.acquire("a")
    with pytest.raises(BusyError, match="per-client"):
        pool.acquire("a")
    b = pool.acquire("b")
    with pytest.raises(BusyError, match="serving 2"):
        pool.acquire("c")
    assert pool.expire(time.monotonic() + 10) == 2  # both idle past the deadline: stalled
    with pytest.raises(PeerError, match="no progress"):
        a.check()
    c = pool.acquire("a")  # a stalled stream counts no more against its client or the pool
    with pytest.raises(BusyError, match="stalled ones included"):
        pool.acquire("d")  # 3 open (2 stalled): max_open
    for s in (a, b, c):
        s.release()
    assert pool.counts()["open"] == 0
    pool.close()


# ------------------------------------------------------------------ stalled peer mid-stream


class StallingServer(flight.FlightServerBase):
    """Lists `card` honestly, sends its schema and `before` batches, then stops sending."""

    def __init__(self, card, before: int = 1):
        super().__init__("grpc://127.0.0.1:0")
        self.uri = f"grpc://127.0.0.1:{self.port}"
        self.card = card
        self.before = before
        self.entry = CatalogEntry(header=card.header, size=len(card.to_bytes()), rows=len(card))
        self.entry = self.entry.with_locations([self.uri])
        self.release = threading.Event()
        self.serving = threading.Event()

    def list_flights(self, context, criteria):
        return iter([entry_to_flight_info(self.entry, flight)])

    def get_flight_info(self, context, descriptor):
        return entry_to_flight_info(self.entry, flight)

    def do_action(self, context, action):
        body = {"status": "ok", "protocol": "1.0", "node_id": "staller", "fleet_id": self.fleet, "epoch": 1}
        return iter([json.dumps(body).encode()])

    fleet = "default"

    def do_get(self, context, ticket):
        batches = self.card.batches

        def gen():
            yield from batches[: self.before]
            self.serving.set()
            self.release.wait(90)  # bounded: the test ends it sooner
            yield from batches[self.before :]

        return flight.GeneratorStream(batches[0].schema, gen())


@pytest.mark.parametrize("before", [0, 1], ids=["before-first-batch", "mid-card"])
def test_a_stalled_peer_fails_that_fetch_with_a_clear_error_and_others_go_on(make_store, make_server, before):
    card = make_card("slow", 1, nbytes=4 << 20, modules=4)
    ok_card = make_card("fine", 1)
    honest = make_store("honest")
    honest.add(ok_card, published=True)
    good = make_server(honest)
    staller = StallingServer(card, before)
    dst = make_store("dst")
    done: dict[str, object] = {}

    def other() -> None:
        staller.serving.wait(20)
        with Client(good.location, retries=0, timeout=10) as c:
            done["other"] = c.fetch("fine", 1, store=dst).digest

    t = threading.Thread(target=other)
    t.start()
    try:
        with (
            Client(staller.uri, retries=0, timeout=10, read_timeout=1.5) as c,
            pytest.raises(PeerError, match="read deadline"),
        ):
            c.fetch("slow", 1, store=dst)
        t.join(30)
        assert done.get("other") == ok_card.digest  # the other fetch was not held up
        assert [e.name for e in dst.list()] == ["fine"] and not list(dst.tmp_dir.iterdir())
    finally:
        staller.release.set()
        staller.shutdown()


def test_sigterm_exits_within_the_drain_time_while_a_fetch_is_stalled(tmp_path: Path):
    drain_s = 20.0  # the documented drain time (docs/operations.md, "Stopping")
    staller = StallingServer(make_card("slow", 1, nbytes=4 << 20, modules=4))
    staller.fleet = f"stall-{os.getpid()}"
    status = tmp_path / "status.json"
    cmd = [
        str(Path(sys.executable).with_name("loraflight")), "node", "run",
        "--store", str(tmp_path / "store"), "--listen", "grpc://127.0.0.1:0", "--fleet", staller.fleet,
        "--no-discovery", "--peer", staller.uri, "--status-file", str(status), "--log-format", "json",
    ]  # fmt: skip
    log = (tmp_path / "node.log").open("wb")
    p = subprocess.Popen(cmd, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert staller.serving.wait(60), "the node never started fetching from the stalled peer"
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            p.wait(drain_s + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node ignored SIGTERM for {time.monotonic() - t0:.0f} s")
    finally:
        log.close()
        if p.poll() is None:
            p.kill()
            p.wait(10)
        staller.release.set()
        staller.shutdown()


# ------------------------------------------------------------------ endless streams


def _tmp_bytes(store) -> int:
    total = 0
    for f in store.tmp_dir.iterdir():
        with contextlib.suppress(OSError):
            total += f.stat().st_size
    return total


def _put_endless(uri: str, schema, batch, token: str, rows: int | None = None) -> str:
    """One do_put that sends `batch` again and again up to 64 MiB; the error it ends with."""
    cmd = {"op": "publish"} if rows is None else {"op": "publish", "rows": rows}
    desc = flight.FlightDescriptor.for_command(json.dumps(cmd).encode())
    c = flight.FlightClient(uri)
    opts = flight.FlightCallOptions(timeout=30, headers=[(b"authorization", f"Bearer {token}".encode())])
    try:
        writer, meta = c.do_put(desc, schema, opts)
        sent = 0
        try:
            while sent < CAP:
                writer.write_batch(batch)
                sent += batch.get_total_buffer_size()
            writer.done_writing()
            meta.read()
        finally:
            writer.close()
    except flight.FlightError as e:
        return str(e)
    finally:
        c.close()
    return ""


def test_an_endless_repeated_stream_is_refused_at_its_first_repeat(make_store, make_server):
    store = make_store("dst")
    server = make_server(store, write_tokens=["w"])
    card = make_card("loop", 1, nbytes=1 << 20, modules=1)
    schema = card.schema
    batch = pa.record_batch(card.batches[0].columns, schema=schema)
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tmp_bytes(store))
            time.sleep(0.01)

    w = threading.Thread(target=watch)
    w.start()
    try:
        err = _put_endless(server.location, schema, batch, "w")
    finally:
        stop.set()
        w.join(10)
    assert "arrived twice" in err
    assert peak[0] < 8 << 20  # refused after the repeat, not after 64 MiB
    assert not store.list() and not list(store.tmp_dir.iterdir())


def test_every_stream_limit_is_checked_while_streaming(make_store, make_server):
    store = make_store("dst")
    server = make_server(store, write_tokens=["w"], limits=Limits(max_card_bytes=6 << 20))
    card = make_card("many", 1, nbytes=16 << 20, modules=16)  # distinct modules of 1 MiB
    # distinct modules past the size limit: stopped at the limit
    desc = flight.FlightDescriptor.for_command(json.dumps({"op": "publish"}).encode())
    c = flight.FlightClient(server.location)
    opts = flight.FlightCallOptions(timeout=30, headers=[(b"authorization", b"Bearer w")])
    with pytest.raises(flight.FlightError, match="more than the"):
        writer, meta = c.do_put(desc, card.schema, opts)
        for b in card.batches:
            writer.write_batch(pa.record_batch(b.columns, schema=card.schema))
        writer.done_writing()
        meta.read()
        writer.close()
    c.close()
    # absurd row counts are clear refusals, not internal errors
    tiny = make_card("tiny", 1)
    for rows in (10**30, 0, 100_001):
        err = _put_endless(server.location, tiny.schema, tiny.batches[0], "w", rows=rows)
        assert "[lf:card]" in err and "rows" in err and "internal" not in err
    assert not store.list() and not list(store.tmp_dir.iterdir())


# ------------------------------------------------------------------ huge answers


class HugeServer(flight.FlightServerBase):
    """Answers listings, infos and actions with 48 MiB of metadata."""

    def __init__(self):
        super().__init__("grpc://127.0.0.1:0")
        self.uri = f"grpc://127.0.0.1:{self.port}"
        self.blob = b"x" * (48 << 20)

    def _info(self):
        return flight.FlightInfo(
            pa.schema([]), flight.FlightDescriptor.for_path("a", "1"), [], -1, -1, app_metadata=self.blob
        )

    def list_flights(self, context, criteria):
        return iter([self._info()])

    def get_flight_info(self, context, descriptor):
        return self._info()

    def do_action(self, context, action):
        if action.type == "health":
            return iter([json.dumps({"status": "ok", "protocol": "1.0"}).encode()])
        return iter([self.blob])


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from loraflight.federation import Client
    from loraflight.federation.client import node_action

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    uri, what = sys.argv[1], sys.argv[2]
    c = Client(uri, retries=0, timeout=20)
    c.health()
    calls = {"list": c.list, "info": lambda: c.info("a", 1), "node_info": c.node_info,
             "action": lambda: node_action(uri, "status")}
    out = {"before": hwm()}
    try:
        calls[what]()
        out["result"] = "accepted"
    except Exception as e:
        out["result"] = type(e).__name__ + ": " + str(e)[:200]
    out["after"] = hwm()
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("what", ["list", "info", "node_info", "action"])
def test_huge_answers_are_refused_as_they_arrive(what):
    server = HugeServer()
    try:
        r = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, server.uri, what],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["result"].startswith("PeerError"), out
    # KiB: gRPC reads the one message before refusing it, then drops it; nothing copies it
    assert out["after"] - out["before"] < 64 * 1024, out


def test_listing_entries_carry_at_most_16_kib_of_header_and_info_gives_it_whole(make_store, make_server):
    src = make_store("src")
    cards = [make_card(f"long{i}", 1) for i in range(3)]
    import dataclasses

    from loraflight.engine import LoRACard

    long_desc = "d" * 60_000  # a header of about 60 KiB
    built = []
    for c in cards:
        card = LoRACard.build(
            c.modules, name=c.name, version=1, description=long_desc, base_model="tiny-base"
        )
        src.add(card, published=True)
        built.append(card)
    short = make_card("short", 1)
    src.add(short, published=True)
    server = make_server(src)
    raw = flight.FlightClient(server.location)
    crit = json.dumps({"header_max": 16 * 1024}).encode()
    infos = list(raw.list_flights(crit))
    assert len(infos) == 4 and all(len(i.app_metadata) <= 16 * 1024 for i in infos)
    assert sum(b"loraflight_truncated" in bytes(i.app_metadata) for i in infos) == 3
    raw.close()
    with Client(server.location, retries=0) as c:
        entries = {e.name: e for e in c.list()}
        assert entries["long0"].header.description == long_desc  # whole, from get_flight_info
        assert entries["short"].header == short.header
        got = c.fetch("long1", 1, store=make_store("dst"))
        assert got.digest == built[1].digest
    assert dataclasses.is_dataclass(entries["long2"])


def test_notify_and_action_bodies_are_bounded(make_store, make_server):
    server = make_server(make_store("s"))
    c = flight.FlightClient(server.location)
    big = json.dumps({"peer": "grpc://127.0.0.1:1", "pad": "x" * (1 << 20)}).encode()
    with pytest.raises(flight.FlightError, match=r"\[lf:card\].*limit"):
        list(c.do_action(flight.Action("notify", big)))
    c.close()


# ------------------------------------------------------------------ idle DoPut/DoExchange


IDLE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import pyarrow.flight as fl
    from loraflight.testing import make_card

    uri, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    card = make_card("idle", 1)
    opts = fl.FlightCallOptions(timeout=30, headers=[(b"authorization", b"Bearer w")])
    desc = fl.FlightDescriptor.for_command(json.dumps({"op": "publish", "rows": 2}).encode())
    held = []
    for _ in range(n):
        c = fl.FlightClient(uri)
        try:
            if kind == "do_put":
                w, _ = c.do_put(desc, card.schema, opts)
            else:
                w, _ = c.do_exchange(desc, opts)
                w.begin(card.schema)
            held.append((c, w))
        except fl.FlightError:
            c.close()
    print("ready", flush=True)
    sys.stdin.readline()  # idle until the test is done looking
    """
)


@pytest.mark.parametrize("kind", ["do_put", "do_exchange"])
def test_idle_put_and_exchange_streams_are_capped(make_store, make_server, kind):
    def exchange(context, descriptor, reader, writer):
        for _ in range(1000):
            try:
                reader.read_chunk()
            except StopIteration:
                return

    limits = Limits(max_concurrent_puts=2, puts_per_client=2, put_idle_s=1.0)
    server = make_server(make_store("s"), write_tokens=["w"], limits=limits, exchange=exchange)
    before = threads_of(os.getpid())
    p = subprocess.Popen(
        [sys.executable, "-c", IDLE_SCRIPT, server.location, kind, "60"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # the idle deadline passes; more streams could be let in now
        during = threads_of(os.getpid())
    finally:
        p.communicate("done\n", timeout=30)
    assert during - before < 30, (before, during)  # 60 idle streams are not 60 server threads
    wait_for(lambda: not any(v["open"] for v in server.stream_counts().values()), 20, "streams closed")
