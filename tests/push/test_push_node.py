"""api.push end to end: a node exports cards and tells a vLLM / SGLang server through its own
runtime LoRA API (the stand-in of `fake_lora_server`: the real ones need a GPU)."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest

from loraflight.errors import ConfigError
from loraflight.federation.node import Node
from loraflight.testing import TINY_BASE, tiny_card, wait_for
from tests.push.fake_lora_server import FakeLoraServer
from tests.push.helpers import WAIT, assert_folder_is_card, push_config

pytest.importorskip("peft")


@pytest.fixture
def fleet() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_arrival_replacement_and_removal_make_the_documented_calls(
    tmp_path: Path, fleet: str, kind: str
) -> None:
    export = tmp_path / "export"
    server = FakeLoraServer(kind, base_model=TINY_BASE, mounts={"/adapters": export}).start()
    cfg = push_config(tmp_path, fleet, [server.url], **{"export.path_prefix": "/adapters"})
    v1, v2 = tiny_card("skill", 1, seed=1), tiny_card("skill", 2, seed=2, rank=2)
    try:
        with Node(cfg) as n:
            # arrival: one load naming the versioned folder, as the server sees it
            n.store.add(v1)
            wait_for(lambda: server.held() == {"skill": "/adapters/skill-v1"}, WAIT, "skill@1 pushed")
            assert server.calls() == [("load", "skill", 200)]
            assert_folder_is_card(server.files["skill"], v1)
            cfg1 = json.loads(server.files["skill"]["adapter_config.json"])
            assert cfg1["base_model_name_or_path"] == TINY_BASE
            assert (export / "skill").resolve() == (export / "skill-v1").resolve()

            # replacement by v2: unload, then load the new folder
            n.store.add(v2)
            wait_for(lambda: server.held() == {"skill": "/adapters/skill-v2"}, WAIT, "skill@2 pushed")
            assert server.calls()[1:] == [("unload", "skill", 200), ("load", "skill", 200)]
            assert_folder_is_card(server.files["skill"], v2)
            assert (export / "skill").resolve() == (export / "skill-v2").resolve()

            # removal of v2: the newest version left (v1) takes its place
            n.store.remove(v2.digest)
            wait_for(lambda: server.held() == {"skill": "/adapters/skill-v1"}, WAIT, "rollback to skill@1")
            assert server.calls()[3:] == [("unload", "skill", 200), ("load", "skill", 200)]
            assert_folder_is_card(server.files["skill"], v1)

            # removal of the last version: unloaded, stable name gone
            n.store.remove(v1.digest)
            wait_for(lambda: server.held() == {}, WAIT, "skill unloaded")
            assert server.calls()[5:] == [("unload", "skill", 200)]
            assert not (export / "skill").exists() and not (export / "skill").is_symlink()
            text = n.metrics.text()
            assert f'loraflight_push_calls_total{{op="load",outcome="ok",server="{server.url}"}} 3.0' in text
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_server_down_at_first_then_restarted_empty_gets_exactly_the_admitted_adapters(
    tmp_path: Path, fleet: str, kind: str
) -> None:
    port = _free_port()
    token = "s3cret-token-for-push"
    (tmp_path / "tok").write_text(token + "\n")
    cfg = push_config(
        tmp_path,
        fleet,
        [f"{kind}+http://127.0.0.1:{port}"],
        **{"api.push_token_file": str(tmp_path / "tok")},
    )
    export = tmp_path / "export"
    want = {"a": str(export / "a-v1"), "b": str(export / "b-v3")}
    with Node(cfg) as n:
        n.store.add(tiny_card("a", 1, seed=3))
        n.store.add(tiny_card("b", 3, seed=4))
        assert n.wait_idle()
        # nobody listens yet: rounds fail, are counted, and are retried
        wait_for(
            lambda: (
                (n.metrics.registry.get_sample_value("loraflight_failures_total", {"kind": "push"}) or 0) >= 2
            ),
            WAIT,
            "failed push rounds counted",
        )
        server = FakeLoraServer(kind, base_model=TINY_BASE, port=port, token=token).start()
        try:
            # a stray adapter the node does not admit goes: the server ends with exactly the node's
            with server.lock:
                server.adapters["stray"] = "/elsewhere/stray"
            wait_for(lambda: server.held() == want, WAIT, "the server brought in line")
            wait_for(lambda: n.status()["push"][server.url]["ok"], WAIT, "push status ok")
            assert n.status()["push"][server.url]["adapters"] == want
        finally:
            server.stop()
        # restarted empty on the same port: loaded again within a few intervals
        server = FakeLoraServer(kind, base_model=TINY_BASE, port=port, token=token).start()
        try:
            wait_for(lambda: server.held() == want, WAIT, "the restarted server brought back in line")
            assert all(s == 200 for _, _, s in server.calls())
        finally:
            server.stop()


def test_a_card_for_another_base_model_is_neither_exported_nor_pushed(tmp_path: Path, fleet: str) -> None:
    server = FakeLoraServer("vllm", base_model=TINY_BASE).start()
    export = tmp_path / "export"
    try:
        with Node(push_config(tmp_path, fleet, [server.url])) as n:
            n.store.add(tiny_card("other", 1, base_model="someone/else"))
            n.store.add(tiny_card("good", 1))
            wait_for(lambda: server.held() == {"good": str(export / "good-v1")}, WAIT, "good pushed")
            assert n.wait_idle()
            assert {e.name for e in n.store.list()} == {"other", "good"}
            assert sorted(p.name for p in export.iterdir()) == ["good", "good-v1"]
            assert all(name != "other" for _, name, _ in server.calls())
    finally:
        server.stop()


def test_duplicate_load_answered_400_is_replaced_by_unload_then_load(tmp_path: Path, fleet: str) -> None:
    """A /v1/models that does not list an adapter it holds: vLLM's 400 on the load leads to
    unload + load of the node's folder."""
    export = tmp_path / "export"
    server = FakeLoraServer("vllm", base_model=TINY_BASE, hide_adapters=True).start()
    try:
        with server.lock:
            server.adapters["skill"] = "/old/skill"
        with Node(push_config(tmp_path, fleet, [server.url])) as n:
            n.store.add(tiny_card("skill", 1))
            wait_for(lambda: server.held() == {"skill": str(export / "skill-v1")}, WAIT, "skill replaced")
            assert server.calls()[:3] == [
                ("load", "skill", 400),
                ("unload", "skill", 200),
                ("load", "skill", 200),
            ]
            assert n.metrics.registry.get_sample_value(
                "loraflight_push_calls_total", {"server": server.url, "op": "load", "outcome": "taken"}
            )

            # later rounds: the listing still omits it, and the 400 for the node's own path is
            # taken as "held": no unload/load churn
            def held_count() -> float:
                labels = {"server": server.url, "op": "load", "outcome": "held"}
                return n.metrics.registry.get_sample_value("loraflight_push_calls_total", labels) or 0

            wait_for(lambda: held_count() >= 2, WAIT, "two later rounds")
            assert [c for c in server.calls()[3:] if c != ("load", "skill", 400)] == []
            # removal unloads it although the listing never showed it
            n.store.remove(n.store.list()[0].digest)
            wait_for(lambda: server.held() == {}, WAIT, "skill unloaded")
    finally:
        server.stop()


def test_exported_files_are_readable_by_other_users(tmp_path: Path, fleet: str) -> None:
    server = FakeLoraServer("sglang", base_model=TINY_BASE).start()
    try:
        with Node(push_config(tmp_path, fleet, [server.url])) as n:
            n.store.add(tiny_card("skill", 1))
            assert n.wait_idle()
            folder = tmp_path / "export" / "skill-v1"
            assert folder.stat().st_mode & 0o777 == 0o755
            assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
                "adapter_config.json": 0o644,
                "adapter_model.safetensors": 0o644,
            }
    finally:
        server.stop()


def test_push_needs_export_dir_and_valid_targets(tmp_path: Path, fleet: str) -> None:
    cfg = push_config(tmp_path, fleet, ["vllm+http://127.0.0.1:9"], export_dir="")
    with pytest.raises(ConfigError, match=r"api\.push needs export_dir"):
        Node(cfg).start()
    for bad in ("http://127.0.0.1:8000", "tgi+http://h:1", "vllm+http://h", "vllm+http://h:1/v1"):
        with pytest.raises(ConfigError, match=r"api\.push"):
            push_config(tmp_path, fleet, [bad])
    with pytest.raises(ConfigError, match=r"api\.push_token_file"):
        Node(
            push_config(tmp_path, fleet, ["vllm+http://127.0.0.1:9"], **{"api.push_token_file": "/nope"})
        ).start()
