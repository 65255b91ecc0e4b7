"""iperf3 over loopback: the one-TCP-stream reference of the transfer benchmark."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time


def iperf3_rate(seconds: int = 3) -> float | None:
    exe = shutil.which("iperf3")
    if exe is None:
        return None

    with socket.socket() as probe:  # a free port (iperf3 cannot be told to pick one)
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    srv = subprocess.Popen(
        [exe, "-s", "-1", "-B", "127.0.0.1", "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(50):
            r = subprocess.run(
                [exe, "-c", "127.0.0.1", "-p", port, "-t", str(seconds), "-P", "1", "-J"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if r.returncode == 0:
                try:
                    return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 8
                except (ValueError, KeyError, TypeError):
                    return None  # iperf3 reported an error instead of a result
            time.sleep(0.1)
        return None
    finally:
        with contextlib.suppress(Exception):
            srv.kill()
            srv.wait(5)


__all__ = ["iperf3_rate"]
