"""Test-only pause points: inert unless LORAFLIGHT_TEST_PAUSE is set.

`LORAFLIGHT_TEST_PAUSE=phase` or `phase:k` makes the process that reaches `pause_point(phase,
k)` create the file named by LORAFLIGHT_TEST_PAUSE_MARKER and then wait (bounded, 120 s) to be
killed: crash tests SIGKILL it there. Phases: `stage_batches` (after k batches written),
`after_fsync`, `before_rename`, `before_index_commit`, `serve_batches` (server sent k batches).
Bundles (several cards per stream, stored as one group): `bundle_after_fsync` (k: the group's
files, all fsynced, none renamed), `group_before_rename` and `group_before_index_commit` (k: the
store's k-th group commit), `group_renamed` (k: files of the group renamed so far),
`serve_bundle_cards` (server sent k whole cards of a bundle). The swarm: `swarm_piece_kept`
(k: pieces a fetch holds, its k-th just renamed into the store's kept pieces), `serve_pieces`
(server sent k pieces).
"""

from __future__ import annotations

import os
import time

ENV = "LORAFLIGHT_TEST_PAUSE"
MARKER_ENV = "LORAFLIGHT_TEST_PAUSE_MARKER"
_MAX_WAIT_S = 120.0


def pause_point(phase: str, count: int | None = None) -> None:
    """Pause here (to be killed) when LORAFLIGHT_TEST_PAUSE names this phase (and count)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, k = spec.partition(":")
    if want != phase or (k and count is not None and int(k) != count):
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        with open(marker, "w") as f:
            f.write(f"{phase}:{count}\n")
    deadline = time.monotonic() + _MAX_WAIT_S
    while time.monotonic() < deadline:  # waiting to be SIGKILLed by the test
        time.sleep(0.05)


__all__ = ["ENV", "MARKER_ENV", "pause_point"]
