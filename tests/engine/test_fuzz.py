"""Fuzzing in CI: thousands of mutated cards through open -> touch -> verify, in a subprocess so a
crash in native code fails this test instead of killing pytest."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = int(os.environ.get("LORAFLIGHT_FUZZ_CASES", "10000"))


def _run(tmp_path: Path, cases: int, seed: int) -> dict:
    progress = tmp_path / f"progress-{seed}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.engine.fuzz_driver",
            "--cases",
            str(cases),
            "--seed",
            str(seed),
            "--progress",
            str(progress),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        case = struct.unpack("<q", progress.read_bytes()[:8])[0] if progress.exists() else -1
        pytest.fail(
            f"fuzz worker died (exit {proc.returncode}) at case {case} of seed {seed}:\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_cards_only_raise_card_error(tmp_path: Path, seed: int) -> None:
    summary = _run(tmp_path, CASES // 2, seed)
    assert summary["cases"] == CASES // 2
    assert summary["failed"] == 0, json.dumps(summary["failures"], indent=1)
    assert set(summary["outcomes"]) <= {"ok", "CardError"}
    # the mutations really did bite, and every kind ran
    assert summary["outcomes"]["CardError"] > summary["cases"] // 2
    for kind in (
        "truncate",
        "flip_footer",
        "flip_header",
        "flip_tensor",
        "lie_int",
        "random",
        "header_field",
    ):
        assert summary["kinds"].get(kind, 0) > 10, kind
    targeted = [k for k in summary["kinds"] if k.startswith("targeted:")]
    assert len(targeted) >= 30


def test_driver_reports_a_failure(tmp_path: Path) -> None:
    """The checker is not vacuous: an unexpected exception type or a missing defect name is a failure."""
    sys.path.insert(0, str(ROOT))
    from tests.engine.fuzz_driver import check_outcome

    assert check_outcome("x", "other", "TypeError: boom", None, False) == "TypeError: boom"
    assert check_outcome("x", "hang", "deadline", None, False) == "deadline"
    assert check_outcome("t", "CardError", "bad thing", "shape disagrees", True) is not None
    assert check_outcome("t", "ok", "", "digest", True) is not None
    assert check_outcome("t", "CardError", "... digest mismatch ...", "digest|NaN", True) is None
    assert check_outcome("t", "ok", "", None, False) is None


def test_bench_fuzz_command_runs(tmp_path: Path) -> None:
    """The 100,000-case command (`python -m bench fuzz`) works, here at a small scale."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "fuzz", "--cases", "300", "--chunk", "150"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| failures (wrong exception, hang, or defect not named) | 0 |" in proc.stdout
    listing = subprocess.run(
        [sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0 and "bench_card" in listing.stdout and "fuzz_cards" in listing.stdout
