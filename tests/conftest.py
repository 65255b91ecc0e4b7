"""Shared test set-up: offline Hugging Face, a derandomized hypothesis profile for CI,
and a guard that fails tests leaking threads."""

from __future__ import annotations

import os
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
