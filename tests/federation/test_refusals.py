"""Every Flight handler refuses bad input with a clear `[lf:code]` message: no internal
error, no traceback line of the server's code, no server path."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.flight as flight
import pytest

import loraflight

SERVER_PATHS = (str(Path(loraflight.__file__).resolve().parent.parent), "site-packages", '.py"')

HUGE = "9" * 5000


def _calls(uri: str):
    hdr = [(b"authorization", b"Bearer w")]
    bad_proto = [(b"loraflight-protocol", f"{HUGE}.0".encode())]

    def opts(extra=()):
        return flight.FlightCallOptions(timeout=10, headers=[*hdr, *extra])

    def c():
        return flight.FlightClient(uri)

    def action(kind, body):
        return lambda: list(c().do_action(flight.Action(kind, json.dumps(body).encode()), opts()))

    return {
        "get_schema missing": lambda: c().get_schema(flight.FlightDescriptor.for_path("nope", "1"), opts()),
        "get_schema cmd": lambda: c().get_schema(flight.FlightDescriptor.for_command(b"x"), opts()),
        "get_schema 3 parts": lambda: c().get_schema(flight.FlightDescriptor.for_path("a", "b", "c"), opts()),
        "info huge version": lambda: c().get_flight_info(flight.FlightDescriptor.for_path("a", HUGE), opts()),
        "protocol major 5000 digits": lambda: list(
            c().do_action(flight.Action("health", b""), opts(bad_proto))
        ),
        "protocol on list": lambda: list(c().list_flights(b"", opts(bad_proto))),
        "criteria since 10**30": lambda: list(
            c().list_flights(json.dumps({"since": 10**30}).encode(), opts())
        ),
        "criteria limit 10**30": lambda: list(
            c().list_flights(json.dumps({"limit": 10**30}).encode(), opts())
        ),
        "criteria header_max": lambda: list(
            c().list_flights(json.dumps({"header_max": -1}).encode(), opts())
        ),
        "criteria float": lambda: list(c().list_flights(json.dumps({"since": 1e308}).encode(), opts())),
        "criteria huge int text": lambda: list(
            c().list_flights(b'{"since": ' + HUGE.encode() + b"}", opts())
        ),
        "criteria keys": lambda: list(c().list_flights(json.dumps({"x" * 5000: 1}).encode(), opts())),
        "ticket": lambda: c().do_get(flight.Ticket(b"\xff" * 64), opts()).read_all(),
        "bundle ticket": lambda: c().do_get(flight.Ticket(b"cards:" + b"a," * 300), opts()).read_all(),
        "unknown action": action("x" * 5000, {}),
        "delete version": action("delete", {"name": "a", "version": 10**30}),
        "delete name": action("delete", {"name": 5}),
        "withdraw garbage": action("withdraw", {"name": HUGE}),
        "notify": action("notify", {"peer": "grpc://" + HUGE}),
        "exchange": lambda: (
            c().do_exchange(flight.FlightDescriptor.for_command(b"x"), opts())[1].read_chunk()
        ),
    }


@pytest.mark.parametrize("name", list(_calls("grpc://127.0.0.1:1")))
def test_bad_input_is_a_clear_refusal(make_store, make_server, name):
    server = make_server(make_store("s"), write_tokens=["w"])
    call = _calls(server.location)[name]
    with pytest.raises((flight.FlightError, Exception)) as ei:
        call()
    msg = str(ei.value)
    assert "[lf:" in msg and "[lf:internal]" not in msg, msg[:500]
    assert not any(p in msg for p in SERVER_PATHS), msg[:1000]
    assert len(msg) < 4000, msg[:500]  # nothing echoes a huge input back
