"""A flood of bad calls does not flood the log: refusals are summed up per kind and interval
(issue 13, floods: rate-limited logging), while the caller still gets each refusal."""

from __future__ import annotations

import logging

import pyarrow.flight as flight
import pytest

from loraflight.federation import Client


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "loraflight.federation.server" and "refused" in r.getMessage()
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c._conn.do_action(flight.Action("notify", b"{not json"), c._opts()),
        lambda c: c._conn.do_action(flight.Action("delete", b'{"digest": 7}'), c._opts()),  # variant
    ],
    ids=["malformed-notify", "malformed-delete"],
)
def test_a_flood_of_malformed_calls_logs_a_few_lines_and_refuses_every_call(
    make_store, make_server, caplog: pytest.LogCaptureFixture, call
) -> None:
    server = make_server(make_store())
    caplog.set_level(logging.INFO, logger="loraflight.federation.server")
    refused = 0
    with Client(server.location, retries=0) as c:
        for _ in range(200):
            try:
                list(call(c))
            except flight.FlightError:
                refused += 1
    assert refused == 200  # every call still gets its clear refusal
    lines = _refusal_lines(caplog)
    assert len(lines) <= 5, [r.getMessage() for r in lines]
