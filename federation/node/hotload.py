"""The node's hot-load rules, as pure functions: what may reach the engine, what waits for
lineage parents, what must stay pinned.

No threads, no sockets, no store: each rule is a function of a catalog entry, the node's
config values and what is loaded now. `loader.Loader` applies them to a running engine.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

from loraflight.engine.card import verify_signature
from loraflight.errors import TrustError

from ..protocol import CatalogEntry

Loaded = Mapping[str, tuple[int, str]]  # adapter name -> (version, digest)


def trust_refusal(entry: CatalogEntry, trust_engine: str, engine_keys: Collection[str]) -> str | None:
    """Why `trust.engine` forbids serving this card, hot-loaded or exported (None: allowed).

    The store checked any signature on entry; this checks whose it is.
    """
    if trust_engine != "signed":
        return None
    try:
        verify_signature(entry.header, engine_keys, require_signed=True)
    except TrustError as e:
        return f"{e} (trust.engine is 'signed')"
    return None


def engine_refusal(
    entry: CatalogEntry,
    *,
    base_model: str | None,
    loaded: Loaded,
    trust_engine: str,
    engine_keys: Collection[str],
) -> str | None:
    """Why this card must not reach the engine (None: it may).

    Refused: a card for another base model than the engine runs, one `trust_refusal`
    forbids, and one whose name is loaded already at this version or a newer one.
    """
    h = entry.header
    if base_model and h.base_model and h.base_model != base_model:
        return f"it is for base model {h.base_model}, the engine runs {base_model}"
    why = trust_refusal(entry, trust_engine, engine_keys)
    if why:
        return why
    cur = loaded.get(h.name)
    if cur is not None and cur[0] >= h.version:
        return f"version {cur[0]} of {h.name} is already loaded"
    return None


def missing_parents(entry: CatalogEntry, held: Callable[[str], bool]) -> list[str]:
    """Lineage parents of `entry` not in the store yet (`held(digest)`): it loads once none is."""
    return [d for d in entry.header.lineage if not held(d)]


def newest_per_name(entries: Iterable[CatalogEntry]) -> list[CatalogEntry]:
    """The highest version of each name (what a starting node loads)."""
    newest: dict[str, CatalogEntry] = {}
    for e in entries:
        if e.name not in newest or e.version > newest[e.name].version:
            newest[e.name] = e
    return list(newest.values())


def pins_needed(loaded: Loaded, lineage_of: Callable[[str], Iterable[str] | None]) -> set[str]:
    """Digests the engine holds: every loaded card and its lineage ancestors, transitively.

    `lineage_of(digest)`: the parents of a held card (None when not held). These must never
    be evicted, so a loaded child finds its parents again after a restart.
    """
    need: set[str] = set()
    todo = [d for _, d in loaded.values()]
    for _ in range(100_000):  # bounded: each digest is expanded once
        if not todo:
            break
        d = todo.pop()
        if d in need:
            continue
        need.add(d)
        parents = lineage_of(d)
        if parents is not None:
            todo.extend(parents)
    return need


def pin_changes(needed: set[str], pinned_now: set[str]) -> tuple[set[str], set[str]]:
    """(to pin, to unpin) to go from what this node pinned to what the engine needs."""
    return needed - pinned_now, pinned_now - needed


__all__ = [
    "Loaded",
    "engine_refusal",
    "missing_parents",
    "newest_per_name",
    "pin_changes",
    "pins_needed",
    "trust_refusal",
]
