"""Functions run in spawned child processes by the crash and memory tests (spawn, never fork)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _pause_env(phase: str | None, marker: str | None) -> None:
    from loraflight.federation.pause import ENV, MARKER_ENV

    if phase:
        os.environ[ENV] = phase
        os.environ[MARKER_ENV] = marker or ""


def fetch_into(store_dir: str, uri: str, name: str, phase: str | None, marker: str | None) -> None:
    """Fetch `name` from `uri` into a store; pauses (to be SIGKILLed) at `phase`."""
    _pause_env(phase, marker)
    from loraflight.federation import Client, Store

    with Store(store_dir) as s, Client(uri, timeout=60) as c:
        c.fetch(name, store=s)


def serve(
    store_dir: str, port_file: str, phase: str | None, marker: str | None, seconds: float = 120.0
) -> None:
    """Serve a store until killed (bounded); writes the port to `port_file` once listening."""
    _pause_env(phase, marker)
    from loraflight.federation import CardServer, Store

    store = Store(store_dir)
    srv = CardServer(store, node_id="child")
    tmp = Path(port_file + ".tmp")
    tmp.write_text(str(srv.port))
    os.replace(tmp, port_file)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # waiting for the test to kill or time out
        time.sleep(0.1)
    srv.stop(timeout=5)


def wait_for_file(path: Path, timeout: float, proc=None) -> bool:
    """Wait (bounded) until `path` exists; False on timeout or if `proc` exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return True
        if proc is not None and not proc.is_alive():
            return path.exists()
        time.sleep(0.02)
    return False
