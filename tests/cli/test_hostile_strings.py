"""Card- and peer-supplied strings reach the terminal as plain text (issue 13, "Bad data in the tools").

A tag `[/x]` in a card, or a peer's URI or node id holding it, crashed `ls`, `peers` and
`status` (Rich markup); ESC sequences in a description reached the terminal through
`card inspect`. Every command that prints such strings runs here through the real console
script, against a real node holding a forged card and against a hostile Flight server
written below, with variants beyond the issue's: OSC 8 hyperlinks, a CR overwrite, a bidi
override (U+202E), markup in a node id and a fleet name.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from loraflight.engine.card import LoRACard
from loraflight.testing import make_card
from tests.federation.test_cli import Served

from .helpers import run_cli

MARKUP = "[/x]"
CSI = "\x1b[2J\x1b[31m"
OSC8 = "\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07"
CR = "fine\rEVIL"
BIDI = "\u202etxt.exe"
WRITE = "write-token-0123456789"
BAD = ("\x1b", "\r", "\x07", "\u202e", "\x9b")


def _plain(r: Any) -> str:
    """The command's whole output, checked: no traceback, no control character, markup shown."""
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    for c in BAD:
        assert c not in out, (c, out)
    return out


def _forged() -> LoRACard:
    """A card as a hostile peer could make it: markup in tags, base model and author, terminal
    escapes in the description (which an older writer let through), with a valid digest."""
    card = make_card("hostile", 1, tags=(MARKUP, "[bold]t"), base_model=f"{MARKUP}base")
    h = dataclasses.replace(
        card.header, description=f"{CSI}{OSC8}{CR}{BIDI}", author="[link=http://evil.example]a[/link]"
    )
    forged = card.with_header(h)
    return forged.with_header(forged.content_header())


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    d = tmp_path_factory.mktemp("hostile-node")
    (d / "write").write_text(f"{WRITE}\n")
    srv = Served("--store", str(d / "served"), "--listen", "127.0.0.1:0", "--token-file", str(d / "write"))
    card = _forged()
    card.verify()
    card.write(d / "hostile.lora.arrow")
    r = run_cli("publish", str(d / "hostile.lora.arrow"), "--node", srv.uri, "--token-file", str(d / "write"))
    assert r.returncode == 0, r.stderr
    yield srv, d
    assert srv.stop() == 0


class HostileServer(flight.FlightServerBase):
    """Answers `status` and `peers` with hostile strings; every other call fails with them."""

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")
        who = f"{MARKUP}{CSI}node"
        self.peers = [
            {"node_id": f"{MARKUP}{BIDI}", "uri": f"grpc://10.0.0.9:1/{MARKUP}{OSC8}", "state": f"live{CR}",
             "sources": ["mdns", MARKUP], "epoch": 3, "last_ok_ago": 1.0},
        ]  # fmt: skip
        self.status = {
            "node_id": who,
            "fleet_id": f"[red]{MARKUP}fleet{OSC8}",
            "epoch": 1,
            "mdns": True,
            "uris": [f"grpc://127.0.0.1:1/{MARKUP}"],
            "engine": True,
            "base_model": f"{MARKUP}{CSI}",
            "cards": [
                {
                    "ref": f"{MARKUP}@1",
                    "digest": "ab" * 32,
                    "size": 1,
                    "source": f"grpc://h:1/{MARKUP}{BIDI}",
                    "refused": f"other base model {MARKUP}{CR}",
                }
            ],
            "loaded": {},
            "withdrawals": [
                {"name": MARKUP, "version": 1, "signer": OSC8, "time": CSI, "reason": f"{MARKUP}{BIDI}"}
            ],
            "peers": self.peers,
        }

    def do_action(self, context: Any, action: Any) -> Iterator[bytes]:
        if action.type == "status":
            return iter([json.dumps(self.status).encode()])
        if action.type == "peers":
            return iter([json.dumps(self.peers).encode()])
        raise flight.FlightServerError(f"[lf:invalid] refused {MARKUP}{CSI}{OSC8}{CR}{BIDI}")

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[Any]:
        raise flight.FlightServerError(f"[lf:invalid] {MARKUP}{CSI}{BIDI}")

    def get_flight_info(self, context: Any, descriptor: Any) -> Any:
        raise flight.FlightServerError(f"[lf:invalid] {MARKUP}{OSC8}{CR}")


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    srv = HostileServer()
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.port}"
    srv.shutdown()
    t.join(10)


def test_ls_prints_markup_and_escapes_from_a_card_as_text(node: tuple[Served, Path]) -> None:
    srv, _ = node
    r = run_cli("ls", "--node", srv.uri)
    assert r.returncode == 0, r.stderr
    out = _plain(r)
    assert MARKUP in out and "[bold]t" in out and f"{MARKUP}base" in out


def test_card_inspect_escapes_terminal_sequences(node: tuple[Served, Path]) -> None:
    _, d = node
    r = run_cli("card", "inspect", str(d / "hostile.lora.arrow"))
    assert r.returncode == 0, r.stderr
    out = _plain(r)
    assert "\\x1b[2J" in out and "\\x1b]8;;http://evil.example/\\x07" in out  # shown, not obeyed
    assert "fine\\rEVIL" in out and "\\u202etxt.exe" in out
    assert "[link=http://evil.example]a[/link]" in out and MARKUP in out


def test_fetch_and_sync_print_peer_errors_as_text(hostile: str, tmp_path: Path) -> None:
    r = run_cli("fetch", "x", "--node", hostile, "--store", str(tmp_path / "s"))
    assert r.returncode == 1
    assert MARKUP in _plain(r) and "error:" in r.stderr
    r = run_cli("sync", "--node", hostile, "--store", str(tmp_path / "s"))
    assert r.returncode == 1
    assert MARKUP in _plain(r) and "error: peer" in r.stderr


def test_status_and_peers_of_a_hostile_node_print_text(hostile: str) -> None:
    r = run_cli("status", "--node", hostile)
    assert r.returncode == 0, r.stderr
    out = _plain(r)
    assert f"{MARKUP}\\x1b[2J\\x1b[31mnode" in out  # markup in the node id, escapes shown
    assert "[red][/x]fleet" in out and "other base model [/x]fine\\rEVIL" in out
    r = run_cli("peers", "--node", hostile)
    assert r.returncode == 0, r.stderr
    out = _plain(r)
    assert f"{MARKUP}\\u202e" in out and "livefine\\rEVIL" in out


def test_route_prints_catalog_strings_as_text(node: tuple[Served, Path], tmp_path: Path) -> None:
    srv, _ = node
    r = run_cli("ls", "--node", srv.uri, "--json")
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    for e in entries:
        e["locations"] = [f"grpc://10.0.0.9:1/{MARKUP}{OSC8}{BIDI}"]
    (tmp_path / "cat.json").write_text(json.dumps(entries))
    r = run_cli("route", "hostile v1", "--catalog", str(tmp_path / "cat.json"), "--embedder", "hashing",
                "--threshold", "-1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = _plain(r)
    assert "hostile@1" in out and MARKUP in out
