"""Shared test set-up: offline Hugging Face, a derandomized hypothesis profile for CI,
a guard that fails tests leaking threads, and one against pyarrow's simulated SIGINT."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _guard_simulated_sigint() -> None:
    """pyarrow answers a Flight listing that ends *cancelled* (`FlightCancelledError`) by calling
    `PyErr_SetInterrupt()` whatever thread the call ran in (`SignalStopHandler.__exit__`): the
    main thread then raises KeyboardInterrupt. In-process nodes run listings on their own threads,
    so a peer stopping mid-listing could end the whole pytest session (it did, twice, in about
    fifteen full runs). A lone SIGINT is therefore reported, with every thread's stack, and
    ignored; a second one within 2 s (a person pressing Ctrl-C twice) stops the run as usual."""
    last = [0.0]

    def handler(signum: int, frame: object) -> None:
        now = time.monotonic()
        if now - last[0] < 2.0:
            raise KeyboardInterrupt
        last[0] = now
        sys.stderr.write(
            "\nSIGINT ignored once (pyarrow simulates one for a cancelled Flight call); threads:\n"
        )
        faulthandler.dump_traceback(all_threads=True)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


_guard_simulated_sigint()


# Threads that libraries start once per process and keep (not leaks of a test).
_LONG_LIVED = ("pydevd", "ThreadPoolExecutor", "asyncio_", "zeroconf", "Thread-Hub", "torch", "grpc")


@pytest.fixture(autouse=True)
def no_thread_leaks(request: pytest.FixtureRequest):
    """Fail a test that leaves new non-daemon threads running (bounded wait for them to end)."""
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("allow_thread_leak"):
        return
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.daemon and not t.name.startswith(_LONG_LIVED)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
