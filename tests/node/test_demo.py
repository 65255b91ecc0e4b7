"""`loraflight demo` runs to completion and shows the held-out metric change on all three nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraflight.engine.authoring.models import minilm_path


@pytest.mark.slow
def test_demo_runs_and_the_skill_reaches_every_node(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("loraflight"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    r = subprocess.run(
        [exe, "demo", "--json", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-4000:]
    out = r.stdout
    result = json.loads(out[out.rindex("\n{") :])
    if minilm_path() is not None:
        assert result["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    else:
        assert "not installed" in out
    before, after = result["before"], result["after"]
    assert len(before) == len(after) == 3
    assert before[0] == before[1] == before[2]  # the same base model everywhere
    assert after[0] == pytest.approx(after[1], abs=1e-6) and after[0] == pytest.approx(after[2], abs=1e-6)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert all(
        loaded == {"ops-runbook": {"version": 1, "digest": result["digest"]}} for loaded in result["loaded"]
    )
    assert result["propagation_s"] > 0
    assert "held-out margin before" in out and "nodes stopped cleanly" in out
