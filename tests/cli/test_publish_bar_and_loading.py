"""Issue 15's last first-hour items: a progress bar on `publish` (like `fetch`), and a node that
answers `status` while it loads its base model (the real console script in a subprocess)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from loraflight.testing import make_card, node_config, wait_for
from tests.federation.test_cli import Served

from .helpers import exe, run_cli

WRITE = "write-token-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("bar-node")
    (d / "write").write_text(f"{WRITE}\n")
    srv = Served("--store", str(d / "served"), "--listen", "127.0.0.1:0", "--token-file", str(d / "write"))
    yield srv, d
    assert srv.stop() == 0


def _on_a_terminal(args: list[str], timeout: float = 120) -> tuple[int, str, str]:
    """Run `loraflight ARGS` with stderr on a pseudo-terminal: (exit code, stdout, terminal text)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm-256color", "HF_HUB_OFFLINE": "1"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*exe(), *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                            env=env, text=True)  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    t.join(10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


def test_publish_shows_a_bar_on_a_terminal_and_nothing_else(served: Any, tmp_path: Path) -> None:
    srv, d = served
    card = make_card("bar-skill", 1, nbytes=4 << 20, modules=8)
    path = card.write(tmp_path / "bar.lora.arrow")
    rc, out, term = _on_a_terminal(
        ["publish", str(path), "--node", srv.uri, "--token-file", str(d / "write")]
    )
    assert rc == 0, term
    assert out.strip() == f"published bar-skill@1 {card.digest}"
    assert "bar-skill@1" in term and "MB" in term  # the bar: description and bytes sent

    # --json: stdout is one JSON document and the terminal gets no bar
    card2 = make_card("bar-skill", 2, nbytes=1 << 20)
    path2 = card2.write(tmp_path / "bar2.lora.arrow")
    rc, out, term = _on_a_terminal(
        ["publish", str(path2), "--node", srv.uri, "--token-file", str(d / "write"), "--json"]
    )
    assert rc == 0, term
    assert json.loads(out)["digest"] == card2.digest
    assert "bar-skill" not in term

    # not a terminal: silent stderr
    card3 = make_card("bar-skill", 3)
    path3 = card3.write(tmp_path / "bar3.lora.arrow")
    r = run_cli("publish", str(path3), "--node", srv.uri, "--token-file", str(d / "write"))
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_status_answers_while_the_base_model_loads(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from loraflight.engine.authoring.serving_model import build_serving_model
    from loraflight.federation.node import Node

    release = threading.Event()
    entered = threading.Event()

    def slow_model(cfg: Any) -> Any:  # a model build that takes as long as the test wants
        entered.set()
        assert release.wait(120), "the test never released the model build"
        return build_serving_model("tiny")

    cfg = node_config(
        tmp_path / "store",
        "loading-fleet",
        **{"engine.base_model": "tiny", "discovery.enabled": False, "trust.engine": "any"},
    )
    node = Node(cfg, model_factory=slow_model)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            node.start()
        except BaseException as e:  # surfaced below
            errors.append(e)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    try:
        assert entered.wait(60), errors
        addr = f"127.0.0.1:{wait_for(lambda: node.server and node.server.port, 30, 'the Flight server')}"
        r = run_cli("status", "--node", addr)
        assert r.returncode == 0, r.stderr
        assert "starting: loading the base model tiny" in r.stdout
        st = json.loads(run_cli("status", "--node", addr, "--json").stdout)
        assert st["state"] == "loading" and st["loading"]["base_model"] == "tiny"
        assert st["loading"]["elapsed"] >= 0
        # health (status --quiet, the deploy/ probes) says not ready, and why
        r = run_cli("status", "--node", addr, "--quiet")
        assert r.returncode == 1 and "not ready" in r.stderr and "loading its base model" in r.stderr
        release.set()
        starter.join(120)
        assert not starter.is_alive() and not errors, errors
        r = run_cli("status", "--node", addr)
        assert r.returncode == 0, r.stderr
        assert "starting:" not in r.stdout and "engine: base model loraflight/tiny-encoder" in r.stdout
        st = json.loads(run_cli("status", "--node", addr, "--json").stdout)
        assert st["state"] == "running" and st["loading"] is None
        assert run_cli("status", "--node", addr, "--quiet").returncode == 0
    finally:
        release.set()
        starter.join(120)
        node.stop()
