"""A node that cannot start says why in one `LoraflightError`, and the CLI prints one line."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from loraflight.errors import ConfigError, StoreError
from loraflight.federation.cli import main
from loraflight.federation.node import Node
from loraflight.testing import node_config


def test_metrics_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = node_config(
            tmp_path / "s", f"t{uuid.uuid4().hex[:8]}", **{"discovery.enabled": False, "metrics.port": port}
        )
        node = Node(cfg)
        with pytest.raises(ConfigError, match=rf"metrics: cannot serve on 127.0.0.1:{port}"):
            node.start()
    assert node.server is not None and node.server._stopped  # what had started was stopped


def test_store_path_that_is_not_a_directory_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cfg = node_config(tmp_path / "file" / "store", "f", **{"discovery.enabled": False})
    with pytest.raises(StoreError, match="cannot create the node identity key"):
        Node(cfg).start()


def test_cli_os_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "x.lora.arrow"
    assert main(["card", "example", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "file") in err and "Traceback" not in err
