"""Kept connections (federation/connections.py): clients made through one pool share their
connections and a recent `health`, a peer that restarts is dialled afresh, a closed pool
refuses clearly. Real Flight servers on 127.0.0.1."""

from __future__ import annotations

import socket
from typing import Any

import pyarrow.flight as flight
import pytest

from loraflight.errors import PeerError
from loraflight.federation.client import Client
from loraflight.federation.client_io import connect
from loraflight.federation.connections import ConnectionPool
from loraflight.federation.protocol import ACTION_HEALTH
from loraflight.federation.server import CardServer
from loraflight.testing import make_card


class CountingServer(CardServer):
    """A CardServer that counts the actions it answers, per kind."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.actions: dict[str, int] = {}

    def do_action(self, context: Any, action: flight.Action) -> Any:
        self.actions[action.type] = self.actions.get(action.type, 0) + 1
        return super().do_action(context, action)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pool():
    p = ConnectionPool(connect)
    yield p
    p.close()


def test_clients_of_one_pool_share_connections_and_a_recent_health(make_store, pool) -> None:
    s = make_store()
    card = make_card("shared", 1, nbytes=64 << 10)
    s.add(card)
    srv = CountingServer(s, node_id="a")
    try:
        for _ in range(5):  # five one-call clients, as a node makes them (have, ping, ...)
            c = Client(srv.location, pool=pool)
            assert [e.ref for e in c.list()] == ["shared@1"]
            c.close()  # closes nothing shared
        assert pool.dialled == 1
        assert srv.actions.get(ACTION_HEALTH) == 1  # the first client's check stands for the others
        got = Client(srv.location, pool=pool).fetch("shared", 1)
        assert got.digest == card.digest
        assert pool.dialled == 2  # the data connection (bigger messages), once
        assert len(pool) == 2
    finally:
        srv.stop(timeout=10)


def test_without_a_recent_health_each_new_client_checks_again(make_store) -> None:
    srv = CountingServer(make_store(), node_id="a")
    pool = ConnectionPool(connect, health_ttl_s=0.0)
    try:
        for _ in range(3):
            Client(srv.location, pool=pool).list()
        assert srv.actions.get(ACTION_HEALTH) == 3
        assert pool.dialled == 1
    finally:
        pool.close()
        srv.stop(timeout=10)


def test_a_restarted_peer_is_dialled_afresh(make_store, pool) -> None:
    port = free_port()
    s = make_store("a")
    s.add(make_card("before", 1))
    srv = CardServer(s, listen=f"grpc://127.0.0.1:{port}", node_id="a")
    c = Client(f"grpc://127.0.0.1:{port}", pool=pool, timeout=2.0, retries=0)
    assert [e.ref for e in c.list()] == ["before@1"]
    srv.stop(timeout=10)
    with pytest.raises(PeerError):
        c.health()  # the kept connection's peer is gone: unreachable, and the connection dropped
    assert len(pool) == 0
    s2 = make_store("b")
    s2.add(make_card("after", 1))
    srv2 = CardServer(s2, listen=f"grpc://127.0.0.1:{port}", node_id="b")
    try:
        assert [e.ref for e in c.list()] == ["after@1"]  # a new connection to the new server
        assert c.health()["node_id"] == "b"
    finally:
        srv2.stop(timeout=10)


def test_idle_connections_are_closed_and_the_pool_is_bounded(make_store) -> None:
    servers = [CardServer(make_store(f"n{i}"), node_id=f"n{i}") for i in range(3)]
    pool = ConnectionPool(connect, max_connections=2)
    try:
        for srv in servers:
            Client(srv.location, pool=pool).health()
        assert len(pool) == 2  # the least recently used went
        pool.idle_s = 0.0
        Client(servers[0].location, pool=pool).health()
        assert len(pool) == 1  # every other one was idle too long
        before = pool.dialled
        pool.idle_s = 60.0
        Client(servers[0].location, pool=pool).health()
        assert pool.dialled == before  # kept
    finally:
        pool.close()
        for srv in servers:
            srv.stop(timeout=10)


def test_a_closed_pool_refuses_with_a_clear_error(make_store) -> None:
    srv = CardServer(make_store(), node_id="a")
    pool = ConnectionPool(connect)
    try:
        c = Client(srv.location, pool=pool)
        c.health()
        pool.close()
        with pytest.raises(PeerError, match="stopping"):
            c.health()
    finally:
        srv.stop(timeout=10)


_RACE = r"""
import sys, threading, time
import pyarrow.flight as flight
from loraflight.errors import PeerError
from loraflight.federation.client_io import connect
from loraflight.federation.connections import ConnectionPool

class Fast(flight.FlightServerBase):
    def do_action(self, context, action):
        yield flight.Result(b"x")

srv = Fast("grpc://127.0.0.1:0")
uri = f"grpc://127.0.0.1:{srv.port}"
pool = ConnectionPool(connect)
how = sys.argv[1]
end = time.monotonic() + 3.0
calls, errors, refused = [0], [], [0]

def call():
    while time.monotonic() < end:
        try:
            conn = pool.get(uri, None, 1 << 20)
        except PeerError:  # the pool is closed: the node is stopping
            refused[0] += 1
            time.sleep(0.001)
            continue
        try:
            assert [r.body.to_pybytes() for r in conn.do_action(flight.Action("a", b""))] == [b"x"]
            calls[0] += 1
        except Exception as e:
            errors.append(repr(e))

def let_go():
    if how == "close":
        time.sleep(1.0)
        pool.close()
        return
    while time.monotonic() < end:
        pool.drop(uri)
        time.sleep(0.0005)

threads = [threading.Thread(target=call) for _ in range(4)] + [threading.Thread(target=let_go)]
for t in threads:
    t.start()
for t in threads:
    t.join(30)
assert calls[0] > 0 and not errors, (calls, errors[:3])
assert how != "close" or refused[0] > 0
srv.shutdown()
print("ok")
"""


@pytest.mark.parametrize("how", ["drop", "close"])
def test_calls_racing_the_pool_letting_go_of_their_connection_never_crash(how: str) -> None:
    """Calls start and finish on a connection while the pool drops it (another call found the
    peer unreachable) or closes (the node stops), over and over. The pool used to close the
    connection under calls in other threads, which aborted the process (`bad_weak_ptr` in
    Flight's client, a segfault in `do_action` in a CI run); now every call finishes and a
    closed pool refuses new ones. A child process runs it, so that a crash fails this test."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _RACE, how], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])
