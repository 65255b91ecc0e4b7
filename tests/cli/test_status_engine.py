"""`status` says which base model the engine runs and why it does not hold a card."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from loraflight.testing import make_card

from .helpers import exe, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_shows_the_engine_base_model_and_why_cards_are_not_loaded(tmp_path: Path) -> None:
    from loraflight.engine import keys

    keys.write_keypair(tmp_path / "k")
    (tmp_path / "w").write_text("write-token-0123456789\n")
    hp = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [*exe(), "node", "run", "--store", str(tmp_path / "s"), "--listen", hp, "--no-discovery", "--no-sync",
         "--engine-base-model", "tiny:1", "--trust-key", str(tmp_path / "k" / "loraflight.pub"),
         "--write-token-file", str(tmp_path / "w")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(120):  # bounded: up to about a minute for the node to answer
            if run_cli("status", "--node", hp, "--quiet", "--timeout", "1").returncode == 0:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
        st = json.loads(run_cli("status", "--node", hp, "--json").stdout)
        base = st["base_model"]
        assert base and st["engine"] is True
        other = make_card("other-base", 1, base_model="some/other-model")
        unsigned = make_card("unsigned", 1, base_model=base)
        for c in (other, unsigned):
            c.write(tmp_path / f"{c.header.name}.lora.arrow")
            r = run_cli("publish", str(tmp_path / f"{c.header.name}.lora.arrow"), "--node", hp, "--token-file",
                        str(tmp_path / "w"))  # fmt: skip
            assert r.returncode == 0, r.stderr
        st = json.loads(run_cli("status", "--node", hp, "--json").stdout)
        why = {c["ref"]: c.get("refused", "") for c in st["cards"]}
        assert "some/other-model" in why["other-base@1"] and base in why["other-base@1"]
        assert "unsigned" in why["unsigned@1"] or "sign" in why["unsigned@1"]
        text = run_cli("status", "--node", hp).stdout
        assert f"engine: base model {base}" in text and "no: it is for base model some/other-model" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_node_run_says_it_is_loading_the_model_at_the_default_log_level(tmp_path: Path) -> None:
    hp = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [*exe(), "node", "run", "--store", str(tmp_path / "s"), "--listen", hp, "--no-discovery", "--no-sync",
         "--engine-base-model", "tiny:1", "--trust-engine", "any"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed before the model loads
        assert "loading the base model tiny:1" in first and f"answers on grpc://{hp}" in first
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
