"""`Pusher`: keeps the vLLM / SGLang servers of `api.push` holding exactly the adapters this
node admits, through their own runtime load/unload APIs (rules in `pushrules`).

One thread (``lf-push``) reconciles every server: when poked (an adapter arrived, was replaced
or went away) and every `interval` seconds (a restarted server is brought back in line). One
round per server reads ``GET /v1/models``, plans the calls (`pushrules.plan`) and makes them;
each call is retried with doubling backoff (bounded); a round that fails is logged and counted
and the server is tried again after a backoff no longer than `interval`.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loraflight.errors import ConfigError, PeerError

from .pushrules import Call, PushTarget, backoff, listed_adapters, parse_push, plan, read_token

log = logging.getLogger("loraflight.federation.push")

Desired = Callable[[], Mapping[str, str]]  # name -> adapter folder as the server sees it


class PushClient:
    """The HTTP calls of one server (urllib: nothing to import at node start)."""

    def __init__(self, target: PushTarget, token: str | None = None, timeout: float = 10.0) -> None:
        self.target = target
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        """(HTTP status, decoded answer); PeerError when the server does not answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            return e.code, e.read(500).decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            raise PeerError(f"{method} {url}: {getattr(e, 'reason', e)}") from None
        try:
            return status, (json.loads(raw) if raw.strip() else None)
        except ValueError:
            return status, raw.decode(errors="replace")  # vLLM answers plain text to load/unload

    def adapters(self) -> dict[str, str | None]:
        """The server's adapters: name -> path (None when it does not say)."""
        url = self.target.url("models")
        status, answer = self._request("GET", url)
        if status != 200:
            raise PeerError(f"GET {url}: HTTP {status} {answer}")
        try:
            return listed_adapters(answer)
        except ValueError as e:
            raise PeerError(f"GET {url}: {e}") from None

    def call(self, c: Call) -> tuple[int, Any]:
        """POST one load/unload: (status, answer); PeerError when the server does not answer."""
        return self._request("POST", self.target.url(c.op), c.body())


class Pusher:
    """Reconciles `targets` against `desired()` on its own thread; `start`, `poke`, `stop`.

    `metrics`: the node's `NodeMetrics` (``push_calls``, ``failures``), or None.
    """

    def __init__(
        self,
        targets: Sequence[PushTarget],
        desired: Desired,
        *,
        interval: float = 30.0,
        token: str | None = None,
        metrics: Any = None,
        timeout: float = 10.0,
        attempts: int = 3,
        retry_base: float = 0.2,
        name: str = "lf-push",
    ) -> None:
        self.clients = [PushClient(t, token, timeout) for t in targets]
        self.desired = desired
        self.interval = interval
        self.metrics = metrics
        self.attempts = attempts
        self.retry_base = retry_base
        self.name = name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pushed: dict[str, dict[str, str]] = {c.target.label: {} for c in self.clients}
        self._state: dict[str, dict[str, Any]] = {
            c.target.label: {"ok": None, "error": "", "rounds": 0} for c in self.clients
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Pusher:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def poke(self) -> None:
        """Reconcile now (an adapter arrived, was replaced or went away)."""
        self._wake.set()

    def state(self) -> dict[str, dict[str, Any]]:
        """server label -> ok (last round), error, rounds, adapters pushed."""
        with self._lock:
            return {k: {**v, "adapters": dict(self._pushed[k])} for k, v in self._state.items()}

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        failed_rounds = 0
        while not self._stop.is_set():
            self._wake.clear()
            ok = all([self.reconcile(c) for c in self.clients])
            failed_rounds = 0 if ok else failed_rounds + 1
            wait = self.interval if ok else backoff(failed_rounds, self.retry_base * 2, self.interval)
            self._wake.wait(wait)

    def reconcile(self, client: PushClient) -> bool:
        """One round for one server; True when it now holds exactly what is desired."""
        label = client.target.label
        try:
            desired = dict(self.desired())
            actual = client.adapters()
            with self._lock:
                pushed = dict(self._pushed[label])
            for c in plan(desired, actual, pushed):
                if self._stop.is_set():
                    return False
                self._apply(client, c)
        except PeerError as e:
            log.warning("push to %s: %s", label, e)
            self._count_failure()
            self._set_state(label, False, str(e))
            return False
        self._set_state(label, True, "")
        return True

    def _apply(self, client: PushClient, c: Call) -> None:
        """Make one call, retried with backoff; a load that finds the name taken (400, as vLLM
        answers) unloads it first."""
        label = client.target.label
        for attempt in range(1, self.attempts + 1):
            try:
                status, answer = client.call(c)
            except PeerError as e:
                status, answer = 0, str(e)
            if 200 <= status < 300:
                self._count(label, c.op, "ok")
                log.info("push to %s: %s %s%s", label, c.op, c.name, f" from {c.path}" if c.path else "")
                with self._lock:
                    if c.op == "load" and c.path is not None:
                        self._pushed[label][c.name] = c.path
                    else:
                        self._pushed[label].pop(c.name, None)
                return
            if c.op == "unload" and status in (400, 404):  # not there: nothing to unload
                self._forget(label, c.name)
                self._count(label, c.op, "absent")
                return
            with self._lock:
                ours = self._pushed[label].get(c.name) == c.path
            if c.op == "load" and status == 400 and ours:
                # the server has the name from this very path, pushed by this node: a listing
                # that does not show adapters, not a stranger's adapter
                self._count(label, c.op, "held")
                return
            if c.op == "load" and status == 400 and attempt < self.attempts:
                log.info("push to %s: %s is loaded already (%s); unloading it first", label, c.name, answer)
                self._count(label, c.op, "taken")
                self._apply(client, Call("unload", c.name))
                continue
            self._count(label, c.op, "error")
            what = f"{c.op} {c.name}: " + (f"HTTP {status} {answer}" if status else str(answer))
            if attempt >= self.attempts or self._stop.is_set():
                raise PeerError(what)
            log.info("push to %s: %s failed; retrying", label, what)
            self._stop.wait(backoff(attempt, self.retry_base, self.interval))

    def _forget(self, label: str, name: str) -> None:
        with self._lock:
            self._pushed[label].pop(name, None)

    def _set_state(self, label: str, ok: bool, error: str) -> None:
        with self._lock:
            st = self._state[label]
            st["ok"], st["error"], st["rounds"] = ok, error, st["rounds"] + 1

    def _count(self, label: str, op: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.push_calls.labels(label, op, outcome).inc()

    def _count_failure(self) -> None:
        if self.metrics is not None:
            self.metrics.failures.labels("push").inc()


def start_push(config: Any, desired: Desired, metrics: Any = None) -> Pusher:
    """The node's one call: a started `Pusher` for `config.api.push` (a `NodeConfig`)."""
    if not config.export_dir:
        raise ConfigError(
            "api.push needs export_dir: the servers load the adapter folders written there "
            "(set export_dir, and export.path_prefix if they see it under another path)"
        )
    api = config.api
    token = read_token(api.push_token_file) if api.push_token_file else None
    targets = [parse_push(s) for s in api.push]
    log.info("pushing adapters to %s every %.0f s", ", ".join(t.label for t in targets), api.push_interval)
    return Pusher(targets, desired, interval=api.push_interval, token=token, metrics=metrics).start()


__all__ = ["Desired", "PushClient", "Pusher", "start_push"]
