"""`node run`'s signal wait: a stop and continue (SIGSTOP, SIGCONT: a debugger, a paused
container, a node stopped under load) is not a stop signal; SIGTERM still is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from loraflight.testing import wait_for

SCRIPT = """
import sys, threading, time
from loraflight.federation.node.signals import run_until_signal

def run(stop: threading.Event) -> int:
    for _ in range(3):  # a node has threads: the interrupted wait shows up with them
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    print("up", flush=True)
    stop.wait(60)
    print("stopped", flush=True)
    return 0

sys.exit(run_until_signal(run, drain_s=5))
"""


def test_sigstop_and_sigcont_do_not_stop_the_node_and_sigterm_does() -> None:
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        for _ in range(5):  # CPython's interrupted wait does not show every time: a few rounds
            os.kill(p.pid, signal.SIGSTOP)
            time.sleep(0.3)
            os.kill(p.pid, signal.SIGCONT)
            time.sleep(0.7)  # more than one 0.5 s wait: an interrupted wait has returned by now
            assert p.poll() is None, "SIGSTOP/SIGCONT stopped the process"
        os.kill(p.pid, signal.SIGTERM)
        assert wait_for(lambda: p.poll() is not None, timeout=10.0, what="exit after SIGTERM")
        assert p.returncode == 0
        assert p.stdout.read().strip() == "stopped"
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(5)
