"""The node CLI (every config key as a flag, check-config) and the deploy/ files against it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from loraflight.federation.cli import app, register_commands
from loraflight.federation.cli.node_cmds import SECRET_KEYS
from loraflight.federation.config import KEYS, Key, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
register_commands()
runner = CliRunner()


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def _flag_args(key: Key, value: Any) -> list[str]:
    if key.type is bool:
        on, off = key.flag_names
        return [on if value else off]
    if key.type is list:
        return [a for v in value for a in (key.flag_names[0], v)]
    return [key.flag_names[0], str(value)]


def _sample(key: Key, files: dict[str, str]) -> tuple[Any, Any]:
    """(env value as text, flag value) for a key; both valid and different from each other."""
    from tests.node.test_config import key_values

    vals = key_values(key, files)
    return vals[1], vals[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from loraflight.engine import keys

    d = tmp_path_factory.mktemp("cli")
    pems = []
    for i in range(4):
        p = d / f"f{i}.pem"
        p.write_text("-----BEGIN CERTIFICATE-----\n")
        pems.append(str(p))
    return {"pems": pems, "pubs": [keys.public_key_b64(keys.generate().public_key()) for _ in range(4)]}


@pytest.mark.parametrize("key", KEYS, ids=[k.path for k in KEYS])
def test_node_run_flag_for_every_key_beats_env_and_file(
    key: Key, files: dict[str, Any], tmp_path: Path
) -> None:
    from tests.node.test_config import baseline_config, env_text, key_values, toml_text

    v_file, v_env, v_flag = key_values(key, files)
    cfg = tmp_path / "n.toml"
    cfg.write_text(toml_text({**baseline_config(files), key.path: v_file}))
    env = {key.env: env_text(key, v_env)}
    r = _cli("node", "run", "--config", str(cfg), "--print-config", *_flag_args(key, v_flag), env=env)
    assert r.exit_code == 0, r.output
    if key.path in SECRET_KEYS:  # secrets are never printed: precedence checked on the loaded config
        for v in (v_file, v_env, v_flag):
            assert all(tok not in r.stdout for tok in (v if isinstance(v, list) else [v]))
        assert load_config(cfg, env=env, flags={key.path: v_flag}).get(key.path) == v_flag
        assert load_config(cfg, env=env).get(key.path) == v_env
        return
    got = load_config_from_toml_text(r.stdout, tmp_path)
    assert got.get(key.path) == v_flag
    # without the flag the environment wins over the file
    r = _cli("node", "run", "--config", str(cfg), "--print-config", env=env)
    assert load_config_from_toml_text(r.stdout, tmp_path).get(key.path) == v_env


def load_config_from_toml_text(text: str, tmp_path: Path):
    p = tmp_path / "printed.toml"
    p.write_text(text)
    return load_config(p, env={})


def test_check_config_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "x"\nfleet = ""\n[intervals]\npoll = 0\n')
    r = subprocess.run(
        [str(Path(sys.executable).with_name("loraflight")), "node", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert (
        "3 problems" in r.stderr
        and "listen" in r.stderr
        and "fleet" in r.stderr
        and "intervals.poll" in r.stderr
    )
    good = tmp_path / "good.toml"
    good.write_text('fleet = "prod"\n')
    assert _cli("node", "check-config", str(good)).exit_code == 0


# ---------------------------------------------------------------- deploy/


def _commands_in_deploy() -> list[list[str]]:
    """Every `loraflight ...` invocation written in the deploy files (entrypoint + args included)."""
    cmds: list[list[str]] = []
    unit = (DEPLOY / "loraflight.service").read_text()
    for line in unit.splitlines():
        if line.startswith("ExecStart="):
            cmds.append(shlex.split(line.split("=", 1)[1]))
    cf = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    entry = None
    for line in cf.splitlines():
        m = re.match(r"\s*(ENTRYPOINT|HEALTHCHECK.*CMD)\s+(\[.*\])", line)
        if m:
            arr = yaml.safe_load(m.group(2))
            if m.group(1) == "ENTRYPOINT":
                entry = arr
            cmds.append(arr)
    assert entry is not None
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc in compose["services"].values():
        cmds.append(entry + svc["command"])
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "loraflight.yaml").read_text()):
        if doc["kind"] == "StatefulSet":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                cmds.append(entry + c["args"])
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    cmds.append(c[probe]["exec"]["command"])
    cmds.extend(_header_commands())
    return [c[c.index("loraflight") :] if "loraflight" in c else c for c in (_strip_path(x) for x in cmds)]


def _header_commands() -> list[list[str]]:
    """The `loraflight ...` commands the deploy files' header comments tell a user to type."""
    out = []
    for f in ("Containerfile", "compose.yaml", "loraflight.service", "k8s/loraflight.yaml"):
        for line in (DEPLOY / f).read_text().splitlines():
            text = line.lstrip("# ")
            if not line.startswith("#") or not re.match(r"([A-Z_]+=\S+\s+)*loraflight\s", text):
                continue
            words = shlex.split(text, comments=True)
            words = [w for w in words if "=" not in w or w.startswith("-")]  # drop VAR=value prefixes
            if words and words[0] == "loraflight":
                out.append(words)
    assert out, "the deploy headers show no loraflight command"
    return out


def _strip_path(cmd: list[str]) -> list[str]:
    return [Path(cmd[0]).name, *cmd[1:]] if cmd else cmd


def test_deploy_yaml_parses() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"node1", "node2", "node3"}
    kinds = [d["kind"] for d in yaml.safe_load_all((DEPLOY / "k8s" / "loraflight.yaml").read_text())]
    assert kinds == ["ConfigMap", "Service", "Service", "StatefulSet"]


def test_deploy_commands_and_flags_exist_in_the_cli() -> None:
    cmds = _commands_in_deploy()
    assert len(cmds) >= 8
    for cmd in cmds:
        assert cmd[0] == "loraflight", cmd
        words = [w for w in cmd[1:] if not w.startswith("-")]
        sub = []
        for w in words:  # the subcommand path: node run / status
            if w in (
                "node",
                "run",
                "status",
                "peers",
                "check-config",
                "publish",
                "fetch",
                "ls",
                "keys",
                "new",
            ):
                sub.append(w)
            else:
                break
        r = _cli(*sub, "--help")
        assert r.exit_code == 0, (cmd, r.output)
        for w in cmd[1:]:
            if w.startswith("--"):
                assert w in r.output or w.split("=")[0] in r.output, f"{w} of {cmd} is not a flag of {sub}"


def test_configmap_and_compose_configs_pass_the_validator(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "loraflight.yaml").read_text()))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    p = tmp_path / "node.toml"
    from loraflight.engine import keys

    keys.write_keypair(tmp_path / "publisher")  # stands in for the loraflight-trust ConfigMap
    trust_dir = "/etc/loraflight-trust/publisher.pub"
    assert trust_dir in cm["data"]["node.toml"]
    fleet_secret = tmp_path / "fleet.secret"  # stands in for the loraflight-fleet / compose secret
    fleet_secret.write_text("0123456789abcdef0123456789abcdef\n")
    assert "/etc/loraflight-fleet/secret" in cm["data"]["node.toml"]
    p.write_text(
        cm["data"]["node.toml"]
        .replace(trust_dir, str(tmp_path / "publisher" / "loraflight.pub"))
        .replace("/etc/loraflight-fleet/secret", str(fleet_secret))
    )
    env = {"LORAFLIGHT_ADVERTISE": "grpc://10.0.0.5:8815", "LORAFLIGHT_TOKENS_WRITE": "0123456789abcdef0123"}
    for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]:
        if e["name"].startswith("LORAFLIGHT_") and e["name"] not in env:
            # a Secret's value stands in as a sample token
            env[e["name"]] = e.get("value", "fedcba9876543210fedcba")
    cfg = load_config(p, env=env)
    assert cfg.discovery.dns and not cfg.discovery.enabled
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert cfg.discovery.dns[0].startswith(svc["metadata"]["name"] + ".")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert "fleet_secret" in compose["secrets"] and compose["x-node"]["secrets"] == ["fleet_secret"]
    node_toml = tmp_path / "compose-node.toml"
    node_toml.write_text(
        (DEPLOY / "compose" / "node.toml").read_text().replace("/run/secrets/fleet_secret", str(fleet_secret))
    )
    for name, svc in compose["services"].items():
        env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in svc["environment"].items()}
        cfg = load_config(node_toml, env=env)
        assert cfg.fleet_secret_file == str(fleet_secret), name
        others = {f"grpc://{o}:8815" for o in compose["services"] if o != name}
        assert set(cfg.discovery.peers) == others, name
        assert cfg.advertise == [f"grpc://{name}:8815"]
    tomllib.loads((DEPLOY / "compose" / "node.toml").read_text())


def test_container_image_is_non_root_with_healthcheck() -> None:
    cf = (DEPLOY / "Containerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", cf, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*", cf, re.M)
    assert re.search(r'^ENTRYPOINT \["loraflight", "node", "run"\]', cf, re.M)


def test_systemd_unit_is_hardened_and_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "loraflight.service").read_text()
    for directive in ("DynamicUser=yes", "StateDirectory=loraflight", "Restart=on-failure", "NoNewPrivileges=yes",
                      "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):  # fmt: skip
        assert directive in unit, directive
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # Point ExecStart at this tree's console script so verify can check that the binary exists.
    exe = Path(sys.executable).with_name("loraflight")
    local = tmp_path / "loraflight.service"
    local.write_text(unit.replace("/usr/local/bin/loraflight", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [line for line in r.stderr.splitlines() if "loraflight.service" in line]
    assert r.returncode == 0 and not problems, r.stderr


def _k8s() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DEPLOY / "k8s" / "loraflight.yaml").read_text()))


def test_images_have_an_explicit_tag_that_the_documented_build_makes() -> None:
    from loraflight import __version__

    image = f"localhost/loraflight:{__version__}"
    sts = next(d for d in _k8s() if d["kind"] == "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"] == image and c["imagePullPolicy"] == "IfNotPresent"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["x-node"]["image"] == image and compose["x-node"]["pull_policy"] == "build"
    for f in ("Containerfile", "k8s/loraflight.yaml"):  # each says how to build that tag
        assert f"build -f deploy/Containerfile -t {image} ." in (DEPLOY / f).read_text(), f


def test_k8s_has_a_client_service_and_serves_the_engine_api(tmp_path: Path) -> None:
    docs = _k8s()
    headless, client = (d for d in docs if d["kind"] == "Service")
    assert headless["spec"]["clusterIP"] == "None" and client["spec"].get("clusterIP") != "None"
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {p["name"] for p in client["spec"]["ports"]} == {"flight", "api"}
    for port in client["spec"]["ports"]:
        assert port["targetPort"] in container_ports
    assert client["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]
    node_toml = tomllib.loads(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["node.toml"])
    assert node_toml["engine"]["base_model"]
    assert node_toml["api"]["listen"] == f"0.0.0.0:{container_ports['api']}"


def test_systemd_documentation_points_at_what_its_install_steps_install() -> None:
    unit = (DEPLOY / "loraflight.service").read_text()
    docs = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("Documentation=")]
    assert docs
    for d in docs:
        assert d.startswith("file://"), d
        target = d.removeprefix("file://")
        install = next(line for line in unit.splitlines() if line.startswith("#") and line.endswith(target))
        src = shlex.split(install.lstrip("# "))[-2]
        assert (ROOT / src).is_file(), install


def test_probes_work_on_a_node_with_read_tokens(tmp_path: Path) -> None:
    """The container's HEALTHCHECK and the pod's probes, run against a node that requires read tokens."""
    from tests.federation.test_cli import Served

    read = tmp_path / "read.tokens"
    read.write_text("read-token-0123456789\n")
    srv = Served("--store", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--read-token-file", str(read))
    port = srv.uri.rsplit(":", 1)[1]
    try:
        probes = [c for c in _commands_in_deploy() if c[:2] == ["loraflight", "status"] and "--quiet" in c]
        assert len(probes) >= 4
        exe = str(Path(sys.executable).with_name("loraflight"))
        for probe in probes:
            argv = [exe, *(w.replace("8815", port) for w in probe[1:])]
            base = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLIGHT_TOKEN")}
            runs = {
                "none": base,
                "env": {**base, "LORAFLIGHT_TOKEN": "read-token-0123456789"},
                "file": {**base, "LORAFLIGHT_TOKEN_FILE": str(read)},
            }
            rc = {
                k: subprocess.run(argv, env=e, capture_output=True, timeout=60).returncode
                for k, e in runs.items()
            }
            assert rc == {"none": 1, "env": 0, "file": 0}, (probe, rc)
    finally:
        assert srv.stop() == 0
