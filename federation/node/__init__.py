"""A loraflight node: store + Flight server + discovery + peer table + sync loop + engine hot-load.

`Node` (module `lifecycle`) wires the parts: `service` (the Flight service with the
`peers` and `status` actions), `loops` (peer, sync and event loops), `hotload` (the pure
rules: what may load, lineage, pinning) applied by `loader`, `export` (PEFT folders),
`status` (status dict, status file, gauges) and `engine` (what the node needs of an
engine, and `build_engine`).
"""

from __future__ import annotations

from .engine import NodeEngine, build_engine
from .lifecycle import CardCallback, Node
from .service import ACTION_PEERS, ACTION_STATUS, NodeServer, NodeView

__all__ = [
    "ACTION_PEERS",
    "ACTION_STATUS",
    "CardCallback",
    "Node",
    "NodeEngine",
    "NodeServer",
    "NodeView",
    "build_engine",
]
