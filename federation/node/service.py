"""The node's Flight service: the card protocol plus the `peers` and `status` actions.

`NodeServer` knows nothing of `Node`: it gets a `NodeView`, the few read-only callables
those actions need.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraflight.errors import BusyError

from ..membership.wire import ACTIONS as MEMBERSHIP_ACTIONS
from ..protocol import ACTION_HEALTH
from ..server import CardServer, edge

ACTION_PEERS = "peers"
ACTION_STATUS = "status"


@dataclass(frozen=True)
class NodeView:
    """What the node's service reads from the node."""

    loaded: Callable[[], dict[str, dict[str, Any]]]  # adapters loaded: name -> version, digest
    live_peers: Callable[[], int]  # how many peers are live
    peers: Callable[[], list[dict[str, Any]]]  # the peer table's snapshot
    status: Callable[[], dict[str, Any]]  # the status dict
    # What the node is still doing before it is ready ("loading the base model X (12 s)"), or None.
    starting: Callable[[], str | None] = lambda: None
    # membership actions (kind, body, caller) -> answer; None: membership is off
    membership: Callable[[str, bytes, str], bytes] | None = None


class NodeServer(CardServer):
    """The node's Flight service: the card protocol plus `peers` and `status` actions."""

    def __init__(self, view: NodeView, *args: Any, **kwargs: Any) -> None:
        self._view = view
        super().__init__(*args, **kwargs)

    def node_info(self) -> dict[str, Any]:
        info = super().node_info()
        info["loaded"] = self._view.loaded()
        info["peers"] = self._view.live_peers()
        return info

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [
            *super().list_actions(context),
            (ACTION_PEERS, "the node's peer table: node id, address, state, sources, epoch"),
            (ACTION_STATUS, "node-info plus peers and adapters loaded into the engine"),
            *(MEMBERSHIP_ACTIONS.items() if self._view.membership is not None else ()),
        ]

    @edge  # errors become one Flight error with a message, never a traceback sent to the client
    def do_action(self, context: Any, action: Any) -> Any:
        if action.type == ACTION_PEERS:
            return iter([json.dumps(self._view.peers()).encode()])
        if action.type == ACTION_STATUS:
            return iter([json.dumps(self._view.status()).encode()])
        if action.type == ACTION_HEALTH and (doing := self._view.starting()):
            # Not ready yet: health (and so `status --quiet`, the deploy/ probes) fails, saying why.
            raise BusyError(f"not ready: {doing}")
        if action.type in MEMBERSHIP_ACTIONS and self._view.membership is not None:
            body = action.body.to_pybytes() if action.body is not None else b""
            return iter([self._view.membership(action.type, body, context.peer())])
        return super().do_action(context, action)


__all__ = ["ACTION_PEERS", "ACTION_STATUS", "NodeServer", "NodeView"]
