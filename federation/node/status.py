"""What a node reports: the status dict (`loraflight status`, the status file) and the
Prometheus gauges."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loraflight.errors import LoraflightError
from loraflight.files import atomic_write

from ..metrics import NodeMetrics
from ..peers import PeerTable
from ..protocol import PROTOCOL_VERSION
from ..store import Store


def build_status(
    *,
    node_id: str,
    fleet: str,
    uris: Sequence[str],
    store: Store | None,
    mdns: bool,
    arrived: Mapping[str, float],
    loaded: Mapping[str, Mapping[str, Any]],
    loaded_at: Mapping[str, float | None],
    base_model: str | None,
    peers: PeerTable | None,
    sync_rounds: int,
    refused: Mapping[str, str] | None = None,
    engine: object = None,
    loading: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """What `loraflight status` shows and the status file holds.

    `engine`: when it reports its adapters (`engine.Engine.adapters`), `engine_digests` is
    what the engine itself holds (name -> digest), beside what the node loaded into it.
    `refused` maps a card digest to why the engine does not hold it (other base model, unsigned,
    a newer version loaded). `loading` is (base model, `time.monotonic()` when it began) while
    the node still builds its model: `state` is then "loading" and `loading` says what and for how
    long; else `state` is "running" and `loading` is None.
    """
    st = store.stats() if store is not None else {}
    refused = refused or {}
    adapters = getattr(engine, "adapters", None)
    digests = {}
    if isinstance(adapters, Mapping):
        digests = {n: a.get("digest") for n, a in adapters.items() if isinstance(a, Mapping)}
    doing = None
    if loading is not None:
        doing = {
            "doing": f"loading the base model {loading[0]}",
            "base_model": loading[0],
            "elapsed": round(time.monotonic() - loading[1], 1),
        }
    return {
        "state": "loading" if doing else "running",
        "loading": doing,
        "node_id": node_id,
        "fleet_id": fleet,
        "protocol": PROTOCOL_VERSION,
        "uris": list(uris),
        "epoch": store.epoch if store is not None else 0,
        "mdns": mdns,
        "cards": [
            {
                "ref": e.ref,
                "digest": e.digest,
                "size": e.size,
                "source": e.source,
                "at": arrived.get(e.digest),
                **({"refused": refused[e.digest]} if e.digest in refused else {}),
            }
            for e in (store.list() if store is not None else [])
        ],
        "stats": st,
        "loaded": {n: {**v, "at": loaded_at.get(n)} for n, v in loaded.items()},
        "base_model": base_model,
        "engine": engine is not None,
        "peers": peers.snapshot() if peers is not None else [],
        "sync_rounds": sync_rounds,
        "withdrawals": [w.to_dict() for w in store.withdrawals()] if store is not None else [],
        "engine_digests": digests,
        "time": time.time(),
    }


def write_status_file(path: str | os.PathLike[str], status: Mapping[str, Any]) -> Path:
    """Atomically rewrite the status file with `status` as JSON (readers never see half of it)."""
    data = json.dumps(status, indent=1, sort_keys=True).encode()
    return atomic_write(Path(os.path.expanduser(path)), data, durable=False)


def update_gauges(metrics: NodeMetrics, peers: PeerTable | None, store: Store | None, loaded: int) -> None:
    """Peers by state, cards, store bytes, epoch, adapters loaded."""
    if peers is not None:
        counts: dict[str, int] = {"live": 0, "dropped": 0, "pending": 0}
        for p in peers.all():
            counts[p.state] = counts.get(p.state, 0) + 1
        for state, n in counts.items():
            metrics.peers.labels(state).set(n)
    if store is not None:
        with contextlib.suppress(LoraflightError, Exception):
            st = store.stats()
            metrics.cards.set(st["cards"])
            metrics.store_bytes.set(st["bytes"])
            metrics.epoch.set(store.epoch)
    metrics.loaded.set(loaded)


def engine_refusals(
    store: Store | None,
    loaded: Mapping[str, Mapping[str, Any]],
    *,
    base_model: str | None,
    trust_engine: str,
    engine_keys: Sequence[str],
) -> dict[str, str]:
    """digest -> why the engine does not hold that stored card (the hot-load rules, applied now)."""
    from .hotload import engine_refusal

    if store is None:
        return {}
    held = {n: (int(v["version"]), str(v["digest"])) for n, v in loaded.items()}
    digests = {d for _, d in held.values()}
    out = {}
    for e in store.list():
        if e.digest in digests:
            continue
        why = engine_refusal(
            e, base_model=base_model, loaded=held, trust_engine=trust_engine, engine_keys=engine_keys
        )
        out[e.digest] = why or "not loaded (see the node log: the engine refused it or it waits for a parent)"
    return out


__all__ = ["build_status", "engine_refusals", "update_gauges", "write_status_file"]
