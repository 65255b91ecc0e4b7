"""A hostile host for the tests of issue 13: a Flight server that answers like a node of the
fleet (it knows the public fleet id), serves whatever its store holds, names any locations in
its listings, and records every call it gets and whether a bearer token came with it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import Any

from loraflight.federation.server import CardServer
from loraflight.federation.store import Store


class HostileServer(CardServer):
    """`calls`: (what, token kind the call carried: "none" when no token was sent)."""

    def __init__(
        self,
        store: Store,
        *,
        fleet_id: str,
        node_id: str = "hostile",
        named_locations: Sequence[str] = (),
        random_ids: bool = False,
        **kw: Any,
    ) -> None:
        self.calls: list[tuple[str, str]] = []
        self._calls_lock = threading.Lock()
        self._random_ids = random_ids
        named = list(named_locations)
        super().__init__(
            store,
            listen="grpc://127.0.0.1:0",
            fleet_id=fleet_id,
            node_id=node_id,
            peer_locations=lambda _digest: named,
            **kw,
        )

    def _record(self, context: Any, what: str) -> None:
        mw = context.get_middleware("auth")
        with self._calls_lock:
            self.calls.append((what, mw.token if mw is not None else "none"))

    def seen(self, what: str | None = None) -> list[tuple[str, str]]:
        with self._calls_lock:
            return [c for c in self.calls if what is None or c[0] == what]

    def tokens_seen(self) -> list[tuple[str, str]]:
        """Calls that carried a bearer token (none should reach a hostile host)."""
        return [c for c in self.seen() if c[1] != "none"]

    def do_action(self, context: Any, action: Any) -> Any:
        self._record(context, action.type)
        if self._random_ids and action.type in ("health", "node-info"):
            self.node_id = uuid.uuid4().hex  # another node id in every answer
        return super().do_action(context, action)

    def list_flights(self, context: Any, criteria: bytes) -> Any:
        self._record(context, "list")
        return super().list_flights(context, criteria)

    def get_flight_info(self, context: Any, descriptor: Any) -> Any:
        self._record(context, "info")
        return super().get_flight_info(context, descriptor)

    def do_get(self, context: Any, ticket: Any) -> Any:
        self._record(context, "get")
        return super().do_get(context, ticket)


__all__ = ["HostileServer"]
