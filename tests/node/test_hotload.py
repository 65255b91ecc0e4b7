"""The node's hot-load rules as pure functions: no node, no socket, no thread."""

from __future__ import annotations

from loraflight.federation.node.hotload import (
    engine_refusal,
    missing_parents,
    newest_per_name,
    pin_changes,
    pins_needed,
    trust_refusal,
)
from loraflight.federation.protocol import CatalogEntry
from loraflight.testing import TINY_BASE, new_signer, tiny_card


def _entry(name: str = "skill", version: int = 1, **kw: object) -> CatalogEntry:
    card = tiny_card(name, version, **kw)  # type: ignore[arg-type]
    return CatalogEntry(header=card.header, size=1, rows=len(card))


def test_open_engine_trust_allows_an_unsigned_card() -> None:
    assert trust_refusal(_entry(), "open", []) is None


def test_signed_engine_trust_refuses_unsigned_and_foreign_signers() -> None:
    key, pub = new_signer()
    _other, other_pub = new_signer()
    assert "unsigned" in (trust_refusal(_entry(), "signed", [pub]) or "")
    signed = _entry(key=key)
    assert trust_refusal(signed, "signed", [pub]) is None
    why = trust_refusal(signed, "signed", [other_pub])
    assert why is not None and "not a trusted key" in why


def test_engine_refusal_base_model_trust_and_version() -> None:
    e = _entry("skill", 2)
    rules = {"trust_engine": "open", "engine_keys": []}
    assert engine_refusal(e, base_model=TINY_BASE, loaded={}, **rules) is None  # type: ignore[arg-type]
    assert engine_refusal(e, base_model=None, loaded={}, **rules) is None  # type: ignore[arg-type]
    other = engine_refusal(e, base_model="other/model", loaded={}, **rules)  # type: ignore[arg-type]
    assert other is not None and "base model" in other
    same = engine_refusal(e, base_model=TINY_BASE, loaded={"skill": (2, "d")}, **rules)  # type: ignore[arg-type]
    assert same is not None and "already loaded" in same
    newer = engine_refusal(e, base_model=TINY_BASE, loaded={"skill": (3, "d")}, **rules)  # type: ignore[arg-type]
    assert newer is not None and "version 3" in newer
    assert engine_refusal(e, base_model=TINY_BASE, loaded={"skill": (1, "d")}, **rules) is None  # type: ignore[arg-type]
    unsigned = engine_refusal(e, base_model=TINY_BASE, loaded={}, trust_engine="signed", engine_keys=[])
    assert unsigned is not None and "unsigned" in unsigned


def test_missing_parents_lists_lineage_not_held() -> None:
    from loraflight.engine.authoring.compose import make_child

    parent = tiny_card("base-skill", 1)
    child = make_child(parent, tiny_card("tone", 1, seed=5), name="tone")
    entry = CatalogEntry(header=child.header, size=1, rows=len(child))
    assert missing_parents(entry, lambda d: False) == list(child.header.lineage)
    assert parent.digest in child.header.lineage
    assert missing_parents(entry, lambda d: True) == []


def test_newest_per_name_keeps_the_highest_version() -> None:
    entries = [_entry("a", 1), _entry("a", 3), _entry("b", 1), _entry("a", 2, seed=4)]
    got = {e.name: e.version for e in newest_per_name(entries)}
    assert got == {"a": 3, "b": 1}


def test_pins_needed_follows_lineage_transitively_and_once() -> None:
    lineage = {"c": ("b",), "b": ("a",), "a": (), "x": ("a",)}
    need = pins_needed({"child": (1, "c"), "other": (1, "x")}, lineage.get)
    assert need == {"a", "b", "c", "x"}
    assert pins_needed({"gone": (1, "z")}, lineage.get) == {"z"}  # not held: pinned alone
    assert pins_needed({}, lineage.get) == set()


def test_pin_changes_pins_new_needs_and_unpins_swapped_out() -> None:
    assert pin_changes({"a", "b"}, {"b", "old"}) == ({"a"}, {"old"})
    assert pin_changes(set(), set()) == (set(), set())
