"""What every benchmark needs about the machine it runs on: the CPU model, the load average,
and (for the network-namespace benchmarks) re-running itself as root inside `unshare -n -m`."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_in_lab(module: str, argv: Sequence[str] | None, inside: Callable[[], int]) -> int:
    """Run `inside()` when already in the lab (LORAFLIGHT_IN_LAB=1); else re-run `python -m
    module argv` as root in a private network and mount namespace, and return its exit status."""
    if os.environ.get("LORAFLIGHT_IN_LAB") == "1":
        return inside()
    if os.geteuid() != 0:
        print("needs root: network namespaces", file=sys.stderr)
        return 2
    env = {**os.environ, "LORAFLIGHT_IN_LAB": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    fwd = list(sys.argv[1:] if argv is None else argv)
    cmd = ["unshare", "-n", "-m", sys.executable, "-m", module, *fwd]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


__all__ = ["ROOT", "cpu_model", "load_average", "run_in_lab"]
