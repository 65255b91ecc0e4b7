"""Zeroconf discovery on loopback: announce, epoch update, goodbye, fleets kept apart."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from loraflight.federation.discovery import (
    Discovery,
    choose_interfaces,
    instance_name,
    parse_txt,
    resolve_dns,
    txt_record,
)


def test_txt_round_trip_and_limits() -> None:
    props = txt_record(node_id="abcd", fleet="f", proto="1.0", tls=True, epoch=42)
    ann = parse_txt(
        {k.encode(): v.encode() for k, v in props.items()}, addresses=["10.1.2.3"], port=9, instance="x"
    )
    assert ann is not None
    assert (ann.node_id, ann.fleet, ann.epoch, ann.tls, ann.uris) == (
        "abcd",
        "f",
        42,
        True,
        ("grpc+tls://10.1.2.3:9",),
    )
    with pytest.raises(ValueError, match="255"):
        txt_record(node_id="n" * 300, fleet="f", proto="1", tls=False, epoch=0)
    assert parse_txt({b"fleet": b"f"}, addresses=["1.2.3.4"], port=1, instance="x") is None  # no id
    assert (
        parse_txt({b"id": b"a", b"fleet": b"f", b"v": b"9"}, addresses=["1.2.3.4"], port=1, instance="x")
        is None
    )
    assert len(instance_name("f" * 100)) <= 63


def test_unknown_interface_falls_back_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(OSError):
        choose_interfaces(["no-such-if0"])
    d = Discovery(node_id="x", fleet="f", port=1, proto="1.0", interfaces=["no-such-if0"])
    with caplog.at_level("WARNING"):
        assert d.start() is False
    assert "falling back to static and DNS peers" in caplog.text
    d.stop()


def test_resolve_dns_localhost() -> None:
    uris = resolve_dns("localhost", 8815)
    assert "grpc://127.0.0.1:8815" in uris
    assert resolve_dns("no-such-host.invalid", 1) == []


def test_loopback_discovery_update_goodbye_and_fleets() -> None:
    fleet = f"t{uuid.uuid4().hex[:10]}"
    events: list[tuple[str, str, str, int]] = []
    cv = threading.Condition()

    def make(i: int, fl: str) -> Discovery:
        def cb(ev: str, ann) -> None:
            with cv:
                events.append((f"n{i}", ev, ann.node_id, ann.epoch))
                cv.notify_all()

        return Discovery(
            node_id=f"{fleet}-n{i}",
            fleet=fl,
            port=1000 + i,
            proto="1.0",
            interfaces=["127.0.0.1"],
            on_peer=cb,
        )

    def wait(pred, timeout: float = 15.0) -> bool:
        end = time.monotonic() + timeout
        with cv:
            while not pred() and time.monotonic() < end:
                cv.wait(0.1)
            return pred()

    nodes = [make(1, fleet), make(2, fleet), make(3, fleet + "x")]
    try:
        assert all(n.start() for n in nodes)
        assert wait(
            lambda: (
                ("n1", "added", f"{fleet}-n2", 0) in events and ("n2", "added", f"{fleet}-n1", 0) in events
            )
        )
        nodes[0].update_epoch(7)
        assert wait(lambda: ("n2", "updated", f"{fleet}-n1", 7) in events)
        nodes[1].stop()
        assert wait(lambda: any(e[:3] == ("n1", "removed", f"{fleet}-n2") for e in events))
        # The other fleet's node saw neither, and neither saw it.
        assert not any(e[0] == "n3" for e in events)
        assert not any(e[2] == f"{fleet}-n3" for e in events)
    finally:
        for n in nodes:
            n.stop()


def test_failed_start_closes_what_it_opened() -> None:
    """A start that fails half-way (here: a TXT entry too long) leaves no Zeroconf socket open."""
    import os

    before = len(os.listdir("/proc/self/fd"))
    d = Discovery(
        node_id=uuid.uuid4().hex[:16],
        fleet="f",
        port=1,
        proto="1.0",
        interfaces=["127.0.0.1"],
        advertise="grpc://" + "a" * 300 + ":1",
    )
    with pytest.raises(ValueError, match="longer than 255"):
        d.start()
    d.stop()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_flood_of_service_names_stays_bounded() -> None:
    """A host announcing endless instance names cannot grow the tables or the resolve tasks."""
    import asyncio

    from zeroconf import ServiceStateChange

    from loraflight.federation.discovery import MAX_NAMES, MAX_RESOLVES, SERVICE_TYPE

    d = Discovery(node_id="me", fleet="f", port=1, proto="1.0", interfaces=["127.0.0.1"])

    async def flood() -> tuple[int, int]:
        d._names["peer-0"] = "n0"  # a known peer is kept through pruning
        for i in range(MAX_NAMES + 500):
            d._on_change(None, SERVICE_TYPE, f"peer-{i}.{SERVICE_TYPE}", ServiceStateChange.Added)
        d._on_change(None, SERVICE_TYPE, "peer-0", ServiceStateChange.Updated)
        seen = (len(d._gen), len(d._tasks))
        for t in list(d._tasks):
            t.cancel()
        await asyncio.gather(*d._tasks, return_exceptions=True)
        return seen

    names, tasks = asyncio.run(flood())
    assert names <= MAX_NAMES and tasks <= MAX_RESOLVES
    assert "peer-0" in d._gen
