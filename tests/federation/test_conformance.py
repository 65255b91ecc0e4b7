"""A grpcio client in a separate process (it must not share a process with pyarrow's Flight)
checks the wire format: actions, health JSON, FlightInfo fields, DoGet bodies, version refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraflight.testing import make_card

pytest.importorskip("grpc", reason="grpcio is a dev dependency for the conformance client")


def test_grpcio_wire_conformance(make_store, make_server):
    s = make_store()
    card = make_card("wire", 2, nbytes=5 << 20, modules=3)
    e = s.add(card)
    srv = make_server(s)
    script = Path(__file__).with_name("_grpc_conformance.py")
    r = subprocess.run(
        [sys.executable, str(script), f"127.0.0.1:{srv.port}"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert {"health", "node-info", "notify", "delete"} <= set(out["actions"])
    assert out["health"]["status"] == "ok" and out["health"]["protocol"] == "1.0"
    (listed,) = out["listed"]
    assert listed["name"] == "wire" and listed["digest"] == card.digest == listed["ticket"]
    assert listed["rows"] == len(card) and listed["bytes"] == e.size
    assert listed["locations"] == [srv.location]
    assert 0 < listed["body_bytes"] <= e.size and listed["messages"] == len(card.batches) + 1
    assert "major versions differ" in out["major2"]
