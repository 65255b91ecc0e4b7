"""Node on loopback, in-process: static peers, notify-driven sync, hot-load policy, export,
metrics, status/peers actions, and the daemon's SIGTERM exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from loraflight.engine import Engine, keys
from loraflight.engine.authoring.models import tiny_encoder
from loraflight.errors import ConfigError
from loraflight.federation.client import node_action
from loraflight.federation.config import load_config
from loraflight.federation.node import Node
from loraflight.testing import TINY_BASE, node_config, tiny_card, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _engine() -> Engine:
    model, _ = tiny_encoder(seed=0)
    return Engine(model, base_model=TINY_BASE)


def test_static_pair_syncs_hot_loads_swaps_and_calls_back(tmp_path: Path, fleet: str, signer) -> None:
    key, pub = signer
    events: dict[str, list[str]] = {"added": [], "loaded": [], "removed": []}
    lock = threading.Lock()

    def rec(kind: str):
        def cb(entry) -> None:
            with lock:
                events[kind].append(entry.ref)

        return cb

    export = tmp_path / "export"
    c1 = node_config(tmp_path / "n1", fleet, **{"discovery.enabled": False, "trust.keys": [pub]})
    with Node(c1, engine=_engine()) as n1:
        c2 = node_config(
            tmp_path / "n2",
            fleet,
            **{
                "discovery.enabled": False,
                "discovery.peers": [n1.uri],
                "trust.keys": [pub],
                "export_dir": str(export),
                "metrics.port": 0,
            },
        )
        eng2 = _engine()
        with Node(
            c2,
            engine=eng2,
            on_card_added=rec("added"),
            on_card_loaded=rec("loaded"),
            on_card_removed=rec("removed"),
        ) as n2:
            # n1 learns n2 from its hello (n1 has no static peers).
            wait_for(lambda: n1.peers.live() and n2.peers.live(), what="the pair to meet")
            assert n1.peers.live()[0].node_id == n2.node_id

            n1.store.add(tiny_card("skill", 1, key=key), published=True)
            wait_for(lambda: n2.loaded().get("skill", {}).get("version") == 1, what="skill@1 on n2")
            assert "skill" in eng2.adapters
            n1.store.add(tiny_card("skill", 2, key=key, seed=1), published=True)
            wait_for(
                lambda: n2.loaded().get("skill", {}).get("version") == 2, what="skill@2 swapped in on n2"
            )
            assert list(eng2.adapters) == ["skill"]  # swapped in place, not loaded beside
            wait_for(lambda: events["loaded"] == ["skill@1", "skill@2"], what="load callbacks")
            assert events["added"] == ["skill@1", "skill@2"]
            # exported as PEFT folders for vLLM / LoRAX
            wait_for(lambda: (export / "skill-v2" / "adapter_config.json").is_file(), what="PEFT export")
            assert (export / "skill-v2" / "adapter_model.safetensors").is_file()

            # metrics over HTTP, from the node's own registry
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{n2.metrics.port}/metrics", timeout=5)
                .read()
                .decode()
            )
            assert "loraflight_fetches_total 2.0" in text
            assert 'loraflight_peers{state="live"} 1.0' in text
            assert "loraflight_load_seconds_count 2.0" in text

            # status and peers over Flight (what `loraflight status` / `peers` call)
            st = node_action(n2.uri, "status")
            assert st["loaded"]["skill"]["version"] == 2 and st["node_id"] == n2.node_id
            peers = node_action(n2.uri, "peers")
            assert [p["node_id"] for p in peers] == [n1.node_id] and peers[0]["state"] == "live"
            info = node_action(n2.uri, "node-info")
            assert info["loaded"]["skill"]["digest"] == st["loaded"]["skill"]["digest"] and info["peers"] == 1

            # removing a card from n2's store unloads it and calls back
            n2.store.remove(n2.loaded()["skill"]["digest"])
            wait_for(lambda: "skill" not in n2.loaded(), what="unload after removal")
            wait_for(lambda: events["removed"] == ["skill@2"], what="removed callback")
            assert "skill" not in eng2.adapters
            assert not (export / "skill-v2").exists()


def test_engine_trust_and_base_model_policy(tmp_path: Path, fleet: str, signer) -> None:
    key, pub = signer
    stranger = keys.generate()
    cfg = node_config(tmp_path / "n", fleet, **{"discovery.enabled": False, "trust.keys": [pub]})
    added: list[str] = []
    with Node(cfg, engine=_engine(), on_card_added=lambda e: added.append(e.ref)) as n:
        n.store.add(tiny_card("unsigned", 1))
        n.store.add(tiny_card("stranger", 1, key=stranger))
        n.store.add(tiny_card("othermodel", 1, key=key, base_model="someone/else"))
        n.store.add(tiny_card("good", 1, key=key))
        assert n.wait_idle()
        # Every card entered the store (entry policy 'open'), only the trusted one reached the engine.
        assert {e.name for e in n.store.list()} == {"unsigned", "stranger", "othermodel", "good"}
        assert set(n.loaded()) == {"good"}
        # A newer version swaps in; a lower one arriving later never replaces it.
        n.store.add(tiny_card("good", 3, key=key, seed=2))
        wait_for(lambda: n.loaded()["good"]["version"] == 3, what="good@3")
        n.store.add(tiny_card("good", 2, key=key, seed=3))
        assert n.wait_idle() and "good@2" in added
        assert n.loaded()["good"]["version"] == 3
    # trust.engine = any: unsigned cards load too.
    cfg2 = node_config(tmp_path / "m", fleet, **{"discovery.enabled": False, "trust.engine": "any"})
    with Node(cfg2, engine=_engine()) as m:
        m.store.add(tiny_card("unsigned", 1))
        wait_for(lambda: "unsigned" in m.loaded(), what="unsigned card under trust.engine=any")


def test_restart_hot_loads_what_the_store_holds(tmp_path: Path, fleet: str, signer) -> None:
    key, pub = signer
    cfg = node_config(tmp_path / "n", fleet, **{"discovery.enabled": False, "trust.keys": [pub]})
    with Node(cfg, engine=_engine()) as n:
        n.store.add(tiny_card("skill", 1, key=key))
        n.store.add(tiny_card("skill", 2, key=key, seed=1))
        wait_for(lambda: n.loaded().get("skill", {}).get("version") == 2, what="skill@2")
        node_id = n.node_id
    with Node(cfg, engine=_engine()) as n:
        assert n.node_id == node_id  # persistent identity
        assert n.loaded()["skill"]["version"] == 2


def test_loopback_mdns_trio_propagates(tmp_path: Path, fleet: str, signer) -> None:
    key, pub = signer
    nodes = []
    try:
        for i in range(3):
            cfg = node_config(tmp_path / f"n{i}", fleet, **{"trust.keys": [pub]})
            nodes.append(Node(cfg, engine=_engine()).start())
        wait_for(lambda: all(len(n.peers.live()) == 2 for n in nodes), what="three nodes to meet over mDNS")
        assert all(n.mdns for n in nodes)
        nodes[0].store.add(tiny_card("skill", 1, key=key), published=True)
        wait_for(lambda: all("skill" in n.loaded() for n in nodes), what="skill on all three")
        # each node serves what it fetched: every digest location list grows
        assert all(len(n.store.list()) == 1 for n in nodes)
    finally:
        for n in nodes:
            n.stop()


def test_bad_config_refused_before_anything_starts(tmp_path: Path) -> None:
    from loraflight.errors import ConfigError

    with pytest.raises(ConfigError) as ei:
        load_config(env={}, flags={"store": str(tmp_path), "listen": "nope", "intervals.failures": 0})
    assert "listen" in str(ei.value) and "intervals.failures" in str(ei.value)
    assert not (tmp_path / "index.sqlite").exists()


def test_daemon_sigterm_exits_zero(tmp_path: Path, fleet: str) -> None:
    status = tmp_path / "status.json"
    cmd = [
        str(Path(sys.executable).with_name("loraflight")), "node", "run",
        "--store", str(tmp_path / "store"), "--listen", "grpc://127.0.0.1:0", "--fleet", fleet,
        "--interface", "127.0.0.1", "--status-file", str(status), "--log-format", "json",
    ]  # fmt: skip
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        st = wait_for(
            lambda: status.is_file() and status.read_text(), timeout=60, what="the daemon's status file"
        )
        import json

        uri = json.loads(st)["uris"][0]
        out = subprocess.run(
            [cmd[0], "status", "--uri", uri, "--json"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["fleet_id"] == fleet
        q = subprocess.run([cmd[0], "status", "--uri", uri, "--quiet"], capture_output=True, timeout=60)
        assert q.returncode == 0 and q.stdout == b""
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
        err = p.stderr.read().decode() if p.stderr else ""
        assert rc == 0, err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert any("stopping" in rec["msg"] for rec in lines), err  # structured (JSON) logs
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    # a stopped node: `status --quiet` fails cleanly (the healthcheck's view)
    q = subprocess.run(
        [cmd[0], "status", "--uri", uri, "--quiet", "--timeout", "2"], capture_output=True, timeout=60
    )
    assert q.returncode == 1 and q.stderr.startswith(b"error:")


def test_dns_peer_name_resolves_to_a_node(tmp_path: Path, fleet: str, signer) -> None:
    key, pub = signer
    c1 = node_config(tmp_path / "n1", fleet, **{"discovery.enabled": False, "trust.keys": [pub]})
    with Node(c1) as n1:
        port = n1.port
        c2 = node_config(
            tmp_path / "n2",
            fleet,
            **{"discovery.enabled": False, "discovery.dns": [f"localhost:{port}"], "trust.keys": [pub]},
        )
        with Node(c2) as n2:
            wait_for(lambda: [p.node_id for p in n2.peers.live()] == [n1.node_id], what="the DNS peer")
            assert any(s.startswith("dns:") for s in n2.peers.live()[0].sources)
            n1.store.add(tiny_card("skill", 1, key=key), published=True)
            wait_for(
                lambda: any(e.name == "skill" for e in n2.store.list()), what="skill synced over a DNS peer"
            )


def test_status_and_peers_commands_talk_to_a_running_node(tmp_path: Path, fleet: str) -> None:
    import json

    from typer.testing import CliRunner

    from loraflight.federation.cli import app, register_commands

    register_commands()
    c1 = node_config(tmp_path / "n1", fleet, **{"discovery.enabled": False})
    with Node(c1) as n1:
        c2 = node_config(tmp_path / "n2", fleet, **{"discovery.enabled": False, "discovery.peers": [n1.uri]})
        with Node(c2) as n2:
            wait_for(lambda: n2.peers.live(), what="n2 to reach n1")
            r = CliRunner().invoke(app, ["peers", "--uri", n2.uri, "--json"], catch_exceptions=False)
            assert r.exit_code == 0, r.output
            assert [p["node_id"] for p in json.loads(r.stdout)] == [n1.node_id]
            r = CliRunner().invoke(
                app, ["status", "--uri", n2.uri], env={"COLUMNS": "200"}, catch_exceptions=False
            )
            assert r.exit_code == 0 and n2.node_id in r.stdout and n1.node_id in r.stdout


def test_pair_over_mutual_tls(tmp_path: Path, fleet: str, signer) -> None:
    from loraflight.testing import make_ca

    key, pub = signer
    pki = make_ca(tmp_path)
    tls = {
        "tls.cert": str(pki["server_cert"]),
        "tls.key": str(pki["server_key"]),
        "tls.ca": str(pki["ca"]),
        "tls.client_cert": str(pki["client_cert"]),
        "tls.client_key": str(pki["client_key"]),
        "tls.verify_client": True,
    }
    c1 = node_config(tmp_path / "n1", fleet, **{"discovery.enabled": False, "trust.keys": [pub], **tls})
    with Node(c1) as n1:
        assert n1.uri.startswith("grpc+tls://")
        c2 = node_config(
            tmp_path / "n2",
            fleet,
            **{"discovery.enabled": False, "discovery.peers": [n1.uri], "trust.keys": [pub], **tls},
        )
        with Node(c2) as n2:
            wait_for(lambda: n2.peers.live() and n1.peers.live(), what="the TLS pair to meet")
            n1.store.add(tiny_card("skill", 1, key=key), published=True)
            wait_for(lambda: any(e.name == "skill" for e in n2.store.list()), what="skill over mutual TLS")
            # A node without a client certificate is refused by both: never becomes their peer.
            no_cert = {k: v for k, v in tls.items() if not k.startswith("tls.client")}
            c3 = node_config(
                tmp_path / "n3", fleet, **{"discovery.enabled": False, "discovery.peers": [n1.uri], **no_cert}
            )
            with Node(c3) as n3:
                (peer,) = wait_for(
                    lambda: [p for p in n3.peers.all() if p.failures >= 1], what="a refused call"
                )
                assert peer.state != "live" and not n3.store.list()


def test_child_card_loads_over_its_lineage_parent_whatever_the_arrival_order(
    tmp_path: Path, fleet: str, signer
) -> None:
    from loraflight.engine.authoring.compose import make_child

    key, pub = signer
    parent = tiny_card("base-skill", 1, key=key)
    child = make_child(parent, tiny_card("tone", 1, seed=5), name="tone", key=key)
    assert child.header.lineage == (parent.digest,)
    cfg = node_config(tmp_path / "n", fleet, **{"discovery.enabled": False, "trust.keys": [pub]})
    eng = _engine()
    with Node(cfg, engine=eng) as n:
        n.store.add(child)  # the child commits first: it must wait for its parent, not fail for good
        assert n.wait_idle()
        assert "tone" not in n.loaded()
        n.store.add(parent)
        wait_for(lambda: {"tone", "base-skill"} <= set(n.loaded()), what="child loaded over its parent")
        info = eng.adapters["tone"]
        assert info["parents"] == ("base-skill",)


def test_export_dir_gets_only_what_the_engine_trust_policy_allows(tmp_path: Path, fleet: str, signer) -> None:
    """An exported PEFT folder is served (vLLM, LoRAX): it passes the same trust check as a hot-load."""
    key, pub = signer
    export = tmp_path / "export"
    cfg = node_config(
        tmp_path / "n", fleet, **{"discovery.enabled": False, "trust.keys": [pub], "export_dir": str(export)}
    )
    with Node(cfg) as n:
        n.store.add(tiny_card("unsigned", 1))
        n.store.add(tiny_card("stranger", 1, key=keys.generate()))
        n.store.add(tiny_card("good", 1, key=key))
        assert n.wait_idle()
        assert {e.name for e in n.store.list()} == {"unsigned", "stranger", "good"}
        assert sorted(p.name for p in export.iterdir()) == ["good", "good-v1"]  # + its stable name
    with pytest.raises(ConfigError, match=r"export_dir: .*trust.engine"):
        node_config(tmp_path / "m", fleet, **{"export_dir": str(export)})


def test_a_failed_sync_round_does_not_end_syncing(
    tmp_path: Path, fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in one round (here the index is locked) is logged; later rounds still run."""
    import sqlite3

    import loraflight.federation.node.loops as node_mod

    real_sync = node_mod.sync
    failed: list[int] = []

    def flaky_sync(*args: object, **kw: object) -> object:
        if not failed:
            failed.append(1)
            raise sqlite3.OperationalError("database is locked")
        return real_sync(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(node_mod, "sync", flaky_sync)
    c1 = node_config(tmp_path / "n1", fleet, **{"discovery.enabled": False})
    with Node(c1) as n1:
        c2 = node_config(tmp_path / "n2", fleet, **{"discovery.enabled": False, "discovery.peers": [n1.uri]})
        with Node(c2) as n2:
            wait_for(lambda: n2.peers.live(), what="n2 to see n1")
            n1.store.add(tiny_card("a", 1), published=True)
            wait_for(lambda: failed, what="the failing round")
            n1.store.add(tiny_card("b", 1), published=True)  # its notify triggers another round
            wait_for(lambda: {e.name for e in n2.store.list()} == {"a", "b"}, what="both cards on n2")
            assert 'loraflight_failures_total{kind="sync"} 1.0' in n2.metrics.text()


def test_a_failing_status_action_sends_no_traceback(
    tmp_path: Path, fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from loraflight.errors import LoraflightError

    with Node(node_config(tmp_path / "n", fleet, **{"discovery.enabled": False})) as n:
        assert n.store is not None

        def broken_stats() -> dict[str, int]:
            raise sqlite3.OperationalError("no such table: cards")  # status() fails inside the node

        with monkeypatch.context() as m:
            m.setattr(n.store, "stats", broken_stats)
            with pytest.raises(LoraflightError) as ei:
                node_action(n.uri, "status")
        assert "internal error" in str(ei.value) and "Traceback" not in str(ei.value)


def test_lineage_parent_of_a_loaded_child_is_never_evicted(tmp_path: Path, fleet: str, signer) -> None:
    """A loaded child holds its parent: swapping the parent's name to a newer version must not let
    the store's LRU cap take the old parent's file."""
    from loraflight.engine.authoring.compose import make_child

    key, pub = signer
    parent = tiny_card("base-skill", 1, key=key)
    child = make_child(parent, tiny_card("tone", 1, seed=5), name="tone", key=key)
    parent2 = tiny_card("base-skill", 2, key=key, seed=3)
    cap = sum(len(c.to_bytes()) for c in (parent, child, parent2)) + 64
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{"discovery.enabled": False, "trust.keys": [pub], "store_max_bytes": cap},
    )
    with Node(cfg, engine=_engine()) as n:
        assert n.store is not None
        for card in (parent, child, parent2):  # fetched cards: evictable unless pinned
            n.store.add(card, source="grpc://peer:1")
            assert n.wait_idle()
        assert n.loaded()["base-skill"]["version"] == 2 and "tone" in n.loaded()
        n.store.add(tiny_card("filler", 1, seed=9), source="grpc://peer:1")  # over the cap
        assert n.wait_idle()
        assert n.store.entry_exists(parent.digest)  # tone@1 still needs it
        assert n.store.entry(parent.digest).pinned


def test_a_stopped_node_started_again_syncs_again(tmp_path: Path, fleet: str) -> None:
    c1 = node_config(tmp_path / "n1", fleet, **{"discovery.enabled": False})
    with Node(c1) as n1:
        c2 = node_config(tmp_path / "n2", fleet, **{"discovery.enabled": False, "discovery.peers": [n1.uri]})
        n2 = Node(c2)
        n2.start()
        n2.stop()
        n2.start()  # the same object again: its peer and sync loops must run
        try:
            wait_for(lambda: n2.peers.live(), what="the restarted node to see its peer")
            n1.store.add(tiny_card("a", 1), published=True)
            wait_for(
                lambda: [e.name for e in n2.store.list()] == ["a"], what="a synced to the restarted node"
            )
        finally:
            n2.stop()
