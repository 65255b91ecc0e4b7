"""`node run`'s signal handling: SIGTERM/SIGINT stop the node, and the process is gone within
`DRAIN_S` of the signal whatever its threads are doing (docs/operations.md, "Stopping").

The signals are blocked in every thread (the mask is set before any thread starts, and
threads inherit it) and taken by `sigtimedwait` in the main thread, while the node runs in a
worker thread. So no Python-level handler runs for them, and pyarrow's simulated SIGINT for
a cancelled Flight call (raised when a peer's message is over the size cap) is ignored
instead of stopping the node. A second signal during the drain exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DRAIN_S = 20.0  # from the signal to the process's exit, at most
SIGNALS = {signal.SIGTERM, signal.SIGINT}


def block_stop_signals() -> None:
    """Block SIGTERM/SIGINT in this thread and every thread started after it (call first)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    for sig in SIGNALS:  # the simulated SIGINT of pyarrow finds no Python handler: ignored
        signal.signal(sig, signal.SIG_DFL)


def run_until_signal(run: Callable[[threading.Event], int], drain_s: float = DRAIN_S) -> int:
    """Run `run(stop)` in a worker thread until it returns or a stop signal arrives; after a
    signal, wait for it up to `drain_s`, then end the process (`os._exit`, logs flushed):
    threads still busy (a transfer blocked on a peer, an executor's worker) are not waited
    for. The exit status: what `run` returned, or 1 when the drain ran out. Without a
    signal (`run` returned or raised on its own) it returns or raises as usual."""
    block_stop_signals()
    stop = threading.Event()
    result: list[int] = []
    failed: list[BaseException] = []

    def target() -> None:
        try:
            result.append(run(stop))
        except BaseException as e:  # reported by the main thread
            failed.append(e)

    worker = threading.Thread(target=target, name="loraflight-node", daemon=True)
    worker.start()
    signalled = False
    while worker.is_alive():
        if _stop_signal(0.5):
            log.info("stop signal: draining for at most %.0f s", drain_s)
            stop.set()
            signalled = True
            break
    end = time.monotonic() + drain_s
    while worker.is_alive() and time.monotonic() < end:
        if _stop_signal(min(0.5, max(0.01, end - time.monotonic()))):
            log.warning("second stop signal: exiting now")
            _hard_exit(1)
    if worker.is_alive():
        log.warning("the node did not stop within %.0f s; exiting anyway", drain_s)
        _hard_exit(1)
    if failed:
        raise failed[0]
    code = result[0] if result else 1
    if signalled:
        # the node has stopped; interpreter exit would still join every executor worker (daemon
        # or not, concurrent.futures' atexit hook), and one may be blocked on a peer's read
        _hard_exit(code)
    return code


def _stop_signal(timeout: float) -> bool:
    """Whether SIGTERM/SIGINT arrived within `timeout`. CPython's sigtimedwait returns a
    siginfo with si_signo 0 when the wait is interrupted (SIGSTOP then SIGCONT): not a stop."""
    info = signal.sigtimedwait(SIGNALS, timeout)
    return info is not None and info.si_signo in SIGNALS


def _hard_exit(code: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


__all__ = ["DRAIN_S", "block_stop_signals", "run_until_signal"]
