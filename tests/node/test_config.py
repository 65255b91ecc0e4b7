"""The node config: every key from TOML, environment and flags, with flags > env > file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraflight.engine import keys
from loraflight.errors import ConfigError
from loraflight.federation.config import KEYS, Key, NodeConfig, check_file, load_config, validate


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("cfg")
    pems = []
    for i in range(4):
        p = d / f"f{i}.pem"
        p.write_text("-----BEGIN CERTIFICATE-----\n")
        pems.append(str(p))
    pubs = [keys.public_key_b64(keys.generate().public_key()) for _ in range(4)]
    return {"pems": pems, "pubs": pubs, "dir": d}


def key_values(key: Key, files: dict[str, Any]) -> list[Any]:
    """Three valid values for a key, each different from the previous one."""
    special: dict[str, list[Any]] = {
        "listen": ["grpc://127.0.0.1:1001", "grpc://127.0.0.1:1002", "grpc://0.0.0.0:0"],
        "advertise": [["grpc://10.0.0.1:1"], ["grpc://10.0.0.2:2"], ["grpc://h3.example:3"]],
        "fleet": ["f1", "fleet-2", "f.3"],
        "trust.entry": ["signed", "open", "signed"],
        "trust.engine": ["any", "signed", "any"],
        "trust.keys": [[files["pubs"][1]], [files["pubs"][2]], [files["pubs"][3]]],
        "trust.engine_keys": [[files["pubs"][1]], [files["pubs"][2]], [files["pubs"][3]]],
        "discovery.peers": [["grpc://10.0.0.1:1"], ["grpc://10.0.0.2:2"], ["grpc+tls://a.b:3"]],
        "discovery.dns": [["a.svc:1"], ["b.svc:2"], ["c.svc"]],
        "engine.base_model": ["tiny:1", "tiny:2", "minilm"],
        "engine.device": ["cuda", "cuda:1", "cpu"],
        "log.format": ["json", "text", "json"],
        "log.level": ["DEBUG", "ERROR", "WARNING"],
        "metrics.host": ["127.0.0.2", "0.0.0.0", "::1"],
        "metrics.port": [0, 9100, 9200],
        "tokens.write": [["w" * 16], ["x" * 16], ["y" * 16]],
        "tokens.read": [["r" * 16], ["s" * 16], ["t" * 16]],
        "limits.max_card_bytes": [1 << 20, 1 << 30, 1 << 33],
        "swarm.origin_extra": [0.1, 0.2, 0.5],
        "api.push": [
            ["vllm+http://127.0.0.1:8000"],
            ["sglang+http://10.0.0.2:30000"],
            ["vllm+https://h.x:443"],
        ],
    }
    if key.path in special:
        return special[key.path]
    if (key.path.startswith("tokens.") and key.path.endswith("_file")) or key.path == "fleet_secret_file":
        out = []
        for i in range(3):  # token files hold a token each (16 characters, different per file)
            f = Path(files["pems"][0]).parent / f"{key.name}-{i}.tokens"
            f.write_text(f"# {key.name}\n{key.name[0] * 15}{i}\n")
            out.append(str(f))
        return out
    if key.path.startswith("tls.") and key.type is str:
        return files["pems"][1:]
    if key.type is bool:
        return [not key.default, key.default, not key.default]
    if key.type is int:
        return [1, 2, 3]
    if key.type is float:
        return [1.5, 2.5, 3.5]
    if key.type is list:
        return [["a1"], ["b2"], ["c3"]]
    return [f"/tmp/lf-{key.name}-1", f"/tmp/lf-{key.name}-2", f"/tmp/lf-{key.name}-3"]


def baseline_config(files: dict[str, Any]) -> dict[str, Any]:
    """A config in which every key's test values are valid (TLS files and trust keys present)."""
    pem = files["pems"][0]
    return {
        "tls.cert": pem,
        "tls.key": pem,
        "tls.ca": pem,
        "tls.client_cert": pem,
        "tls.client_key": pem,
        "trust.keys": [files["pubs"][0]],
    }


def toml_text(values: dict[str, Any]) -> str:
    top, tables = [], {}
    for path, v in values.items():
        enc = json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")
        if "." in path:
            sec, name = path.split(".")
            tables.setdefault(sec, []).append(f"{name} = {enc}")
        else:
            top.append(f"{path} = {enc}")
    out = "\n".join(top)
    for sec, lines in tables.items():
        out += f"\n[{sec}]\n" + "\n".join(lines)
    return out + "\n"


def env_text(key: Key, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(v)
    return str(v)


@pytest.mark.parametrize("key", KEYS, ids=[k.path for k in KEYS])
def test_every_key_from_file_env_and_flag_with_precedence(
    key: Key, files: dict[str, Any], tmp_path: Path
) -> None:
    v_file, v_env, v_flag = key_values(key, files)
    base = baseline_config(files)
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(toml_text({**base, key.path: v_file}))

    assert load_config(cfg_file, env={}).get(key.path) == v_file
    env = {key.env: env_text(key, v_env)}
    assert load_config(cfg_file, env=env).get(key.path) == v_env
    assert load_config(cfg_file, env=env, flags={key.path: v_flag}).get(key.path) == v_flag
    # A flag not given (None) leaves env and file in force.
    assert load_config(cfg_file, env=env, flags={key.path: None}).get(key.path) == v_env
    # The environment alone, without a file.
    env_only = {k.env: env_text(k, v) for k, v in ((_key_of(p), v) for p, v in base.items())}
    env_only[key.env] = env_text(key, v_env)
    assert load_config(None, env=env_only).get(key.path) == v_env


def _key_of(path: str) -> Key:
    from loraflight.federation.config import KEYS_BY_PATH

    return KEYS_BY_PATH[path]


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = load_config(env={})
    assert validate(cfg) == []
    assert cfg == NodeConfig()
    p = tmp_path / "c.toml"
    cfg.fleet = "round"
    cfg.discovery.peers = ["grpc://1.2.3.4:5"]
    p.write_text(cfg.to_toml())
    assert check_file(p) == cfg


def test_env_and_flags_keys_are_unique() -> None:
    assert len({k.env for k in KEYS}) == len(KEYS)
    flags = [f for k in KEYS for f in k.flag_names]
    assert len(set(flags)) == len(flags)


def test_bad_config_lists_every_problem(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(
        """
listen = "http://x"
fleet = "bad fleet!"
colour = "blue"
store_max_bytes = "lots"
[tls]
cert = "/nonexistent/cert.pem"
[trust]
entry = "maybe"
keys = ["not-a-key"]
[discovery]
peers = ["grpc://nohostport"]
wat = 1
[intervals]
health = -1
failures = 0
[log]
format = "xml"
[engine]
base_model = "gpt-17"
"""
    )
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={"LORAFLIGHT_SYNC_CONCURRENCY": "many", "LORAFLIGHT_BOGUS": "1"})
    msg = str(ei.value)
    expected = [
        "listen:",
        "fleet:",
        "unknown key 'colour'",
        "store_max_bytes: expected int",
        "tls: cert and key go together",
        "tls.cert: file '/nonexistent/cert.pem' does not exist",
        "trust.entry: 'maybe'",
        "trust.keys: 'not-a-key'",
        "discovery.peers: 'grpc://nohostport' needs a port",
        "unknown key 'discovery.wat'",
        "intervals.health: -1",
        "intervals.failures: 0",
        "log.format: 'xml'",
        "engine.base_model: 'gpt-17'",
        "sync.concurrency: expected int",
    ]
    assert "unknown environment variable LORAFLIGHT_BOGUS" in caplog.text
    missing = [e for e in expected if e not in msg]
    assert not missing, f"not reported: {missing}\n{msg}"
    assert f"{len(expected)} problems" in msg


def test_unreadable_and_invalid_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        check_file(tmp_path / "missing.toml")
    bad = tmp_path / "x.toml"
    bad.write_text("fleet = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        check_file(bad)


def test_signed_hot_load_without_keys_is_refused() -> None:
    with pytest.raises(ConfigError, match="nothing would ever load"):
        load_config(env={}, flags={"engine.base_model": "tiny:1"})
    cfg = load_config(env={}, flags={"engine.base_model": "tiny:1", "trust.engine": "any"})
    assert cfg.engine.base_model == "tiny:1"


def test_advertise_longer_than_a_txt_entry_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"advertise: .* longer than 250 bytes"):
        load_config(env={}, flags={"advertise": ["grpc://" + "a" * 300 + ":1"]})
