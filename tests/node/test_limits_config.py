"""The `[limits]` keys reach the node's Flight server and its clients; bad values are refused
with the key named (the real console script for the CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflight.errors import LoraflightError
from loraflight.federation.client import Client
from loraflight.federation.client_io import READ_TIMEOUT_S
from loraflight.federation.config import NodeConfig
from loraflight.federation.node import Node
from loraflight.federation.node.bounds import client_bounds, server_limits
from loraflight.federation.protocol import MAX_CARD_BYTES
from loraflight.federation.server import Limits
from loraflight.testing import make_card, node_config

from ..cli.helpers import run_cli


def test_default_keys_are_the_built_in_bounds() -> None:
    cfg = NodeConfig()
    assert server_limits(cfg) == Limits()
    assert client_bounds(cfg) == {"read_timeout": READ_TIMEOUT_S, "max_card_bytes": MAX_CARD_BYTES}


def test_a_node_refuses_a_card_over_its_configured_size(tmp_path: Path, fleet: str) -> None:
    token = "limits-write-token-0123"
    flags = {"discovery.enabled": False, "limits.max_card_bytes": 1 << 20, "limits.get_slots": 2,
             "tokens.write": [token]}  # fmt: skip
    with Node(node_config(tmp_path / "n", fleet, **flags)) as n:
        assert n.server is not None and n.server.limits.max_concurrent_gets == 2
        with Client(n.uri, token) as c:
            c.publish(make_card("small", 1, nbytes=64 << 10))
            with pytest.raises(LoraflightError, match="1048576"):
                c.publish(make_card("big", 1, nbytes=2 << 20))
        assert n.store is not None and [e.ref for e in n.store.list()] == ["small@1"]


def test_node_run_names_every_bad_limit_and_exits_1(tmp_path: Path) -> None:
    r = run_cli("node", "run", "--store", str(tmp_path / "s"), "--no-discovery", "--limits-get-slots", "0",
                "--limits-read-timeout", "-1")  # fmt: skip
    assert r.returncode == 1, (r.stdout, r.stderr)  # a config error, as every other key's
    assert "limits.get_slots: 0 is outside 1..1024" in r.stderr
    assert "limits.read_timeout: -1.0 must be > 0" in r.stderr
    assert "Traceback" not in r.stderr
