"""Membership churn on network-namespace hosts with real mDNS on a bridge (see
tests/node/netns_membership.py): join, wrongly suspected under load, SIGKILL + restart,
partition healed; every table converges; a gossiped address is never a sync source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    r = subprocess.run(
        ["unshare", "-n", "-m", "sh", "-c", "ip link add lfprobe type bridge"],
        capture_output=True,
        timeout=20,
    )
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.decode(errors='replace').strip()}"
    return None


REASON = _unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]


def test_membership_churn_converges(tmp_path: Path) -> None:
    env = {**os.environ, "LORAFLIGHT_IN_LAB": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = ["unshare", "-n", "-m", sys.executable, "-m", "tests.node.netns_membership", str(tmp_path)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the churn scenario ran past 300 s:\n{(e.stderr or '')[-6000:]}")
    assert r.returncode == 0, f"churn scenario failed (rc {r.returncode}):\n{r.stderr[-10000:]}"
    sys.stderr.write(r.stderr[-3000:])
    out = json.loads((tmp_path / "result.json").read_text())
    assert len(set(out["ids"].values())) == 6
    assert out["refutations_h3"] >= 1
