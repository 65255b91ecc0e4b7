"""Naming a node, tokens and --json on the network commands (the real console script, a real node)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from loraflight.testing import make_card
from tests.federation.test_cli import Served

from .helpers import run_cli

READ = "read-token-0123456789"
WRITE = "write-token-0123456789"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("node")
    (d / "read").write_text(f"{READ}\n")
    (d / "write").write_text(f"# writers\n{WRITE}\n")
    srv = Served("--store", str(d / "served"), "--listen", "127.0.0.1:0", "--token-file", str(d / "write"),
                 "--read-token-file", str(d / "read"))  # fmt: skip
    yield srv, d
    assert srv.stop() == 0


def _hostport(uri: str) -> str:
    return uri.removeprefix("grpc://")


@pytest.mark.parametrize("cmd", ["ls", "fetch", "publish", "sync", "status", "peers"])
def test_every_one_node_command_takes_node(cmd: str) -> None:
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and "--node" in r.stdout


def test_node_by_host_port_with_tokens_and_json(node, tmp_path: Path) -> None:
    srv, d = node
    hp = _hostport(srv.uri)
    card = make_card("nodes-skill", 1)
    card.write(tmp_path / "c.lora.arrow")
    r = run_cli(
        "publish", str(tmp_path / "c.lora.arrow"), "--node", hp, "--token-file", str(d / "write"), "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ref": "nodes-skill@1", "name": "nodes-skill", "version": 1,
                                    "digest": card.digest, "node": hp}  # fmt: skip
    read = ("--token-file", str(d / "read"))
    r = run_cli("ls", "--node", hp, *read, "--json")
    assert r.returncode == 0, r.stderr
    assert [e["name"] for e in json.loads(r.stdout)] == ["nodes-skill"]
    r = run_cli("fetch", "nodes-skill", "--node", hp, *read, "--store", str(tmp_path / "f"), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["digest"] == card.digest and Path(got["path"]).is_file() and got["size"] > 0
    # sync takes --node repeatedly (the same node twice: one fetch)
    r = run_cli("sync", "--node", hp, "--node", srv.uri, *read, "--store", str(tmp_path / "g"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and [f["digest"] for f in rep["fetched"]] == [card.digest]
    for cmd in ("status", "peers"):
        r = run_cli(cmd, "--node", hp, *read, "--json")
        assert r.returncode == 0, r.stderr
        json.loads(r.stdout)
        r = run_cli(cmd, "--node", hp, "--json", env={"LORAFLIGHT_TOKEN_FILE": str(d / "read")})
        assert r.returncode == 0, r.stderr
    # the old names still work
    assert run_cli("ls", srv.uri, *read).returncode == 0
    assert run_cli("status", "--uri", srv.uri, *read, "--quiet").returncode == 0
    r = run_cli("fetch", "nodes-skill", "--from", hp, *read, "--store", str(tmp_path / "h"))
    assert r.returncode == 0, r.stderr


def test_fetch_of_a_missing_card_names_the_remote_node(node, tmp_path: Path) -> None:
    srv, d = node
    hp = _hostport(srv.uri)
    r = run_cli(
        "fetch", "nosuch", "--node", hp, "--token-file", str(d / "read"), "--store", str(tmp_path / "s")
    )
    assert r.returncode == 1
    assert f"node {hp} has no card nosuch" in r.stderr and "in this store" not in r.stderr
    assert f"loraflight ls --node {hp}" in r.stderr


def test_status_of_a_node_that_is_not_running_says_what_to_check() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("status", "--node", f"127.0.0.1:{port}", "--timeout", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is a node running" in r.stderr and "check the address" in r.stderr
    assert "Flight returned" not in r.stderr


def test_node_run_address_flags_take_host_port_and_uris(tmp_path: Path) -> None:
    r = run_cli("node", "run", "--store", str(tmp_path / "s"), "--listen", "127.0.0.1:8821",
                "--peer", "10.0.0.1:8815", "--peer", "grpc+tls://10.0.0.2:8815", "--advertise", "10.1.1.1:8815",
                "--dns-peer", "grpc://peers.svc:8815", "--dns-peer", "other.svc:9", "--print-config")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'listen = "grpc://127.0.0.1:8821"' in out
    assert 'peers = ["grpc://10.0.0.1:8815", "grpc+tls://10.0.0.2:8815"]' in out
    assert 'advertise = ["grpc://10.1.1.1:8815"]' in out
    assert 'dns = ["peers.svc:8815", "other.svc:9"]' in out


def test_node_run_token_files_and_print_config_hides_secrets(tmp_path: Path) -> None:
    (tmp_path / "w").write_text(f"{WRITE}\n")
    (tmp_path / "r").write_text(f"{READ}\n")
    (tmp_path / "p").write_text("peer-token-0123456789\n")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[tokens]\nread_file = "{tmp_path / "r"}"\n')
    r = run_cli("node", "run", "--config", str(cfg), "--store", str(tmp_path / "s"),
                "--write-token-file", str(tmp_path / "w"), "--peer-token-file", str(tmp_path / "p"),
                "--write-token", "inline-secret-0123456789", "--print-config")  # fmt: skip
    assert r.returncode == 0, r.stderr
    for secret in (WRITE, READ, "peer-token-0123456789", "inline-secret-0123456789"):
        assert secret not in r.stdout + r.stderr
    assert "# write: 2 secrets, not printed" in r.stdout and "# read: 1 secret, not printed" in r.stdout
    assert f'write_file = "{tmp_path / "w"}"' in r.stdout
    r = run_cli("node", "run", "--store", str(tmp_path / "s"), "--read-token-file", str(tmp_path / "nope"),
                "--print-config")  # fmt: skip
    assert r.returncode == 1 and "tokens.read_file" in r.stderr and "Traceback" not in r.stderr


def test_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for args in (["serve", "--store", str(tmp_path / "a")],
                     ["node", "run", "--store", str(tmp_path / "b"), "--no-discovery"]):  # fmt: skip
            r = run_cli(*args, "--listen", f"127.0.0.1:{port}")
            assert r.returncode == 1, r.stderr
            assert f"127.0.0.1:{port} is already in use" in r.stderr and "did not start" not in r.stderr
