"""Multi-host tests in network namespaces joined by a bridge: real multicast over veths.

Each test runs one scenario of `tests/node/netns_lab.py` inside `unshare -n -m`, a private
network and mount namespace made for it, so its namespaces, veths and bridge vanish with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        r = subprocess.run(
            ["unshare", "-n", "-m", "sh", "-c", "ip link add lfprobe type bridge && ip netns list"],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.decode(errors='replace').strip()}"
    return None


_REASON = _netns_unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


def run_scenario(name: str, tmp_path: Path, timeout: float = 420) -> dict:
    env = {**os.environ, "LORAFLIGHT_IN_LAB": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = ["unshare", "-n", "-m", sys.executable, "-m", "tests.node.netns_lab", name, str(tmp_path)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scenario {name} ran past {timeout} s:\n{(e.stderr or '')[-6000:]}")
    assert r.returncode == 0, f"scenario {name} failed (rc {r.returncode}):\n{r.stderr[-8000:]}"
    return json.loads((tmp_path / "result.json").read_text())


def test_three_hosts_mdns_hot_load_link_flap_sigterm_sigkill(tmp_path: Path) -> None:
    out = run_scenario("three_hosts", tmp_path)
    assert len(set(out["ids"].values())) == 3


def test_static_peers_without_discovery(tmp_path: Path) -> None:
    out = run_scenario("static_peers", tmp_path)
    assert len(set(out["ids"].values())) == 2


def test_two_fleets_on_one_link_never_cross_sync(tmp_path: Path) -> None:
    out = run_scenario("two_fleets", tmp_path)
    assert len(set(out["ids"].values())) == 3
