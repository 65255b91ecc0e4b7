"""A node honouring withdrawals, in-process on loopback with real tiny engines: rollback to
the newest remaining version, children of a withdrawn parent unloaded, export removed,
status; a pair that syncs a withdrawal; the `withdraw`, `delete` and `ls` commands through
the real console script."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraflight.engine import Engine, keys
from loraflight.engine.authoring.compose import make_child
from loraflight.engine.authoring.models import tiny_encoder
from loraflight.errors import ConflictError, TrustError
from loraflight.federation.client import Client, node_action
from loraflight.federation.node import Node
from loraflight.federation.withdrawal import new_withdrawal
from loraflight.testing import TINY_BASE, node_config, tiny_card, wait_for

TOKEN = "withdraw-node-token-0123456789"


def _engine() -> Engine:
    model, _ = tiny_encoder(seed=0)
    return Engine(model, base_model=TINY_BASE)


def test_withdrawal_rolls_back_unloads_children_and_removes_the_export(
    tmp_path: Path, fleet: str, signer, caplog
) -> None:
    key, pub = signer
    export = tmp_path / "export"
    v1, v2 = tiny_card("skill", 1, key=key), tiny_card("skill", 2, key=key, seed=1)
    child = make_child(v2, tiny_card("tone", 1, seed=5), name="tone", key=key)
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{
            "discovery.enabled": False,
            "trust.keys": [pub],
            "export_dir": str(export),
            "tokens.write": [TOKEN],
        },
    )
    eng = _engine()
    with Node(cfg, engine=eng) as n:
        for c in (v1, v2, child):
            n.store.add(c, published=True)
        wait_for(lambda: {"skill", "tone"} <= set(n.loaded()), what="skill@2 and its child loaded")
        assert eng.adapters["skill"]["digest"] == v2.digest
        wait_for(lambda: (export / "skill-v2").is_dir(), what="skill@2 exported")
        ids = torch.tensor([[1, 5, 9, 13, 2]])

        def embed(row: str | None) -> torch.Tensor:
            with torch.no_grad():
                return eng.forward_mixed([row], input_ids=ids).last_hidden_state

        before = embed("skill")
        # a request admitted on skill@2 before the withdrawal holds it (what the serving API does)
        lease = eng.lease([v2.digest])
        stranger = keys.generate()
        with Client(n.uri, token=TOKEN) as c:
            with pytest.raises(TrustError):
                c.withdraw("skill@2", stranger)
            assert n.wait_idle()
            assert eng.adapters["skill"]["digest"] == v2.digest and v2.digest in n.store  # nothing changed
            with caplog.at_level(logging.INFO, logger="loraflight.federation.node"):
                out = c.withdraw("skill@2", key, reason="regressed")
                assert out["removed"] == [v2.digest]
                wait_for(
                    lambda: n.loaded().get("skill", {}).get("digest") == v1.digest, what="rollback to skill@1"
                )
                assert n.wait_idle()
        assert eng.adapters["skill"]["digest"] == v1.digest  # the engine itself holds v1
        # the admitted request still finishes on skill@2's weights; new ones run on skill@1
        assert torch.equal(embed(lease.row(v2.digest)), before)
        assert not torch.allclose(embed("skill"), before)
        lease.release()
        assert "tone" not in eng.adapters and "tone" not in n.loaded()
        assert any(
            "unloaded tone" in r.getMessage() and "withdrawn" in r.getMessage() for r in caplog.records
        )
        assert not (export / "skill-v2").exists() and (export / "skill-v1").is_dir()
        st = node_action(n.uri, "status")
        assert [w["name"] for w in st["withdrawals"]] == ["skill"]
        assert st["withdrawals"][0]["reason"] == "regressed"
        assert st["engine_digests"]["skill"] == v1.digest
        with Client(n.uri, token=TOKEN) as c, pytest.raises(ConflictError, match="withdrawn"):
            c.publish(v2)
    # a restart keeps it withdrawn: v1 loads, the child waits for a parent that never comes
    eng2 = _engine()
    with Node(cfg, engine=eng2) as n:
        assert n.wait_idle()
        assert n.loaded().get("skill", {}).get("digest") == v1.digest and "tone" not in n.loaded()
        with pytest.raises(ConflictError, match="withdrawn"):
            n.store.add(v2)


def test_a_peer_learns_the_withdrawal_by_sync_and_rolls_back(tmp_path: Path, fleet: str, signer) -> None:
    key, pub = signer
    v1, v2 = tiny_card("skill", 1, key=key), tiny_card("skill", 2, key=key, seed=1)
    c1 = node_config(tmp_path / "n1", fleet, **{"discovery.enabled": False, "trust.keys": [pub]})
    with Node(c1, engine=_engine()) as n1:
        c2 = node_config(
            tmp_path / "n2",
            fleet,
            **{"discovery.enabled": False, "discovery.peers": [n1.uri], "trust.keys": [pub]},
        )
        eng2 = _engine()
        with Node(c2, engine=eng2) as n2:
            wait_for(lambda: n1.peers.live() and n2.peers.live(), what="the pair to meet")
            n1.store.add(v1, published=True)
            n1.store.add(v2, published=True)
            wait_for(lambda: n2.loaded().get("skill", {}).get("version") == 2, what="skill@2 on n2")
            n1.store.withdraw(new_withdrawal("skill", 2, key))  # as the withdraw action does
            # the epoch bump reaches n2 by notify; n2 pulls the withdrawal and rolls back
            wait_for(lambda: v2.digest not in n2.store, timeout=10, what="n2 to drop skill@2")
            wait_for(
                lambda: eng2.adapters.get("skill", {}).get("digest") == v1.digest,
                timeout=10,
                what="n2 to roll back to skill@1",
            )
            assert [w.ref for w in n2.store.withdrawals()] == ["skill@2"]


def _cli() -> list[str]:
    exe = shutil.which("loraflight", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "loraflight.federation.cli"]


def test_withdraw_delete_and_ls_commands(tmp_path: Path, fleet: str, signer, monkeypatch) -> None:
    key, pub = signer
    keydir = tmp_path / "keys"
    priv, _pub = keys.write_keypair(keydir, key)
    stranger, _ = keys.write_keypair(tmp_path / "stranger")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = node_config(
        tmp_path / "n", fleet, **{"discovery.enabled": False, "trust.keys": [pub], "tokens.write": [TOKEN]}
    )
    env = {"COLUMNS": "200", "PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=60, env=env)

    with Node(cfg) as n:
        for v in (1, 2, 3):
            n.store.add(tiny_card("skill", v, key=key, seed=v), published=True)
        node = f"127.0.0.1:{n.port}"
        r = run("delete", "skill@3", "--node", node, "--token-file", str(token_file))
        assert r.returncode == 0, r.stderr
        assert "comes back from peers" in r.stdout and "unless withdrawn" in r.stdout
        r = run(
            "withdraw", "skill@2", "--node", node, "--key", str(stranger), "--token-file", str(token_file)
        )
        assert r.returncode == 1 and "error:" in r.stderr and "not trusted" in r.stderr, r.stderr
        assert n.store.withdrawals() == []
        r = run("withdraw", "skill", "--node", node, "--key", str(priv), "--token-file", str(token_file))
        assert r.returncode == 1 and "NAME@VERSION" in r.stderr
        r = run(
            "withdraw", "skill@2", "--node", node, "--key", str(priv), "--reason", "bad evals",
            "--token-file", str(token_file),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "withdrawn skill@2" in r.stdout and "1 card(s) deleted" in r.stdout
        assert [e.ref for e in n.store.list()] == ["skill@1"]
        r = run("ls", node)
        assert r.returncode == 0, r.stderr
        assert "skill@2" in r.stdout and "bad evals" in r.stdout and "withdrawn" in r.stdout
        r = run("status", "--node", node)
        assert r.returncode == 0, r.stderr
        assert "withdrawn skill@2" in r.stdout and "bad evals" in r.stdout
