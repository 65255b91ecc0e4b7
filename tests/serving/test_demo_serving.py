"""`loraflight demo` ends by serving: node 3's API answers the openai client with the skill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_demo_queries_node3_over_its_api(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("loraflight"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run(
        [exe, "demo", "--tiny", "--json", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-4000:]
    out = r.stdout
    result = json.loads(out[out.rindex("\n{") :])
    api = result["api"]
    assert api["model"] == "ops-runbook@1" and api["digest"] == result["digest"]
    assert api["margin_in_process"] == result["after"][2]
    assert abs(api["margin_api"] - api["margin_in_process"]) <= 1e-5
    assert api["auto_model"] == "ops-runbook@1,loraflight/tiny-encoder"
    assert api["auto_digests"] == f"{result['digest']},base"
    assert "embeddings.create(model='ops-runbook')" in out and "model='auto'" in out
    assert "held-out margin through node3's API" in out and "nodes stopped cleanly" in out
