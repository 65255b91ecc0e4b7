"""The network CLI end to end: `serve` in a real subprocess, clients through `main()`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loraflight.engine import keys
from loraflight.federation import Store
from loraflight.federation.cli import main
from loraflight.testing import make_card


def loraflight() -> list[str]:
    exe = shutil.which("loraflight", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-c", "from federation.cli import console_main; console_main()"]


class Served:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [*loraflight(), "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.line = ""
        got = threading.Event()

        def read():
            assert self.proc.stdout is not None
            self.line = self.proc.stdout.readline()
            got.set()

        threading.Thread(target=read, daemon=True).start()
        if not got.wait(60) or "serving" not in self.line:
            self.proc.kill()
            raise AssertionError(
                f"serve did not start: {self.line!r} {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.uri = self.line.split()[1]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def test_cli_serve_publish_ls_fetch_sync_trust(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    tokens = tmp_path / "tokens"
    tokens.write_text("# writers\ns3cret\n")
    card = make_card("cli-skill", 1)
    card_path = tmp_path / "cli-skill.lora.arrow"
    card.write(card_path)
    srv = Served("--store", str(tmp_path / "served"), "--listen", "127.0.0.1:0", "--token-file", str(tokens))
    try:
        # publish needs the token: refused without, accepted with the file or the env var
        assert main(["publish", str(card_path), "--to", srv.uri]) == 1
        assert "write token" in capsys.readouterr().err
        assert main(["publish", str(card_path), "--to", srv.uri, "--token-file", str(tokens)]) == 0
        assert card.digest in capsys.readouterr().out
        monkeypatch.setenv("LORAFLIGHT_TOKEN", "s3cret")
        assert main(["publish", str(card_path), "--to", srv.uri]) == 0
        capsys.readouterr()
        assert main(["ls", srv.uri, "--json"]) == 0
        (entry,) = json.loads(capsys.readouterr().out)
        assert entry["name"] == "cli-skill" and entry["locations"] == [srv.uri]
        assert main(["ls", srv.uri]) == 0
        assert "cli-skill" in capsys.readouterr().out
        assert main(["fetch", "cli-skill@1", "--from", srv.uri, "--store", str(tmp_path / "f")]) == 0
        assert card.digest in capsys.readouterr().out
        assert main(["fetch", "cli-skill@7", "--from", srv.uri, "--store", str(tmp_path / "f")]) == 1
        assert "error: " in capsys.readouterr().err
        assert main(["sync", "--from", srv.uri, "--store", str(tmp_path / "g"), "--tag", "demo"]) == 0
        assert "1 fetched" in capsys.readouterr().out
        assert main(["sync", "--from", srv.uri, "--store", str(tmp_path / "g")]) == 0
        assert "0 fetched" in capsys.readouterr().out
        # a signed store refuses the unsigned card, with the reason, and exits 1
        assert main(["sync", "--from", srv.uri, "--store", str(tmp_path / "h"), "--trust", "signed"]) == 1
        assert "unsigned" in capsys.readouterr().err
    finally:
        assert srv.stop() == 0  # SIGTERM: clean stop
    with Store(tmp_path / "f") as s, Store(tmp_path / "h") as h:
        assert s.find("cli-skill").digest == card.digest and len(h) == 0


def test_cli_trust_add_list_remove(tmp_path, capsys):
    kdir = tmp_path / "k"
    keys.write_keypair(kdir)
    pub = keys.public_b64_from_file(kdir / "loraflight.pub")
    store = str(tmp_path / "s")
    assert main(["trust", "add", str(kdir / "loraflight.pub"), "--store", store, "--label", "alice"]) == 0
    sid = keys.signer_id(pub)
    assert sid in capsys.readouterr().out
    assert main(["trust", "list", "--store", store, "--json"]) == 0
    (k,) = json.loads(capsys.readouterr().out)
    assert k["key"] == pub and k["label"] == "alice"
    assert main(["trust", "remove", sid, "--store", store]) == 0
    assert main(["trust", "remove", sid, "--store", store]) == 1
    assert "not a trusted key" in capsys.readouterr().err
    assert main(["trust", "add", "not-a-key", "--store", store]) == 1
    capsys.readouterr()
    # a pasted key text longer than a file name may be is judged as a key, not as a path
    assert main(["trust", "add", "A" * 400, "--store", store]) == 1
    assert "not an Ed25519 public key" in capsys.readouterr().err


def test_cli_serve_bad_config_one_line_error(tmp_path):
    r = subprocess.run(
        [*loraflight(), "serve", "--store", str(tmp_path / "s"), "--tls-cert", str(tmp_path / "missing.pem")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LORAFLIGHT_LOG_LEVEL": "ERROR"},
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("ref", ["a@x", "a@0"])
def test_cli_bad_ref(tmp_path, capsys, ref):
    assert main(["fetch", ref, "--from", "127.0.0.1:9", "--store", str(tmp_path / "s")]) == 1
    assert "version" in capsys.readouterr().err
