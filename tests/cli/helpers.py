"""Run the real `loraflight` console script in a subprocess (what a user types)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def exe() -> list[str]:
    found = shutil.which("loraflight", path=str(Path(sys.executable).parent))
    return (
        [found]
        if found
        else [sys.executable, "-c", "from loraflight.federation.cli import console_main; console_main()"]
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`loraflight ARGS...` to completion, text output captured, no terminal colours."""
    e = {
        **os.environ,
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [*exe(), *args], capture_output=True, text=True, timeout=timeout, env=e, stdin=subprocess.DEVNULL
    )


__all__ = ["exe", "run_cli"]
