"""Mapping a card's module names onto a wrapped model (see the engine's theory of operation).

A card's module paths are relative to the model it was made for. They are mapped onto the
wrapped model by the first rule under which *every* module resolves: (1) as written; (2) with
a PEFT ``base_model.model.`` prefix removed; (3) with 1 to 3 leading components removed;
(4) with a prefix added that the model has. Pure functions over the module tree.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

PEFT_PREFIX = "base_model.model."


def lookup(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted `path`, or None (get_submodule without its per-level checks)."""
    m: nn.Module | None = root
    for part in path.split("."):
        m = m._modules.get(part) if m is not None else None
        if m is None:
            return None
    return m


def strip_peft(n: str) -> str:
    return n[len(PEFT_PREFIX) :] if n.startswith(PEFT_PREFIX) else n


def _same(n: str) -> str:
    return n


def _dropper(k: int) -> Callable[[str], str | None]:
    def fn(n: str) -> str | None:
        return ".".join(strip_peft(n).split(".")[k:]) or None

    return fn


def _prefixer(prefix: str) -> Callable[[str], str]:
    def fn(n: str) -> str:
        return prefix + strip_peft(n)

    return fn


def map_modules(model: nn.Module, names: list[str]) -> tuple[dict[str, str], list[str], str]:
    """(card module -> model path, the card modules left unresolved, the rule used)."""

    def exists(path: str) -> bool:
        return bool(path) and lookup(model, path) is not None

    def attempt(fn: Callable[[str], str | None]) -> dict[str, str]:
        out = {}
        for n in names:
            p = fn(n)
            if p is not None and exists(p):
                out[n] = p
        return out

    rules: list[tuple[str, Callable[[str], str | None]]] = [("names as written", _same)]
    if any(n.startswith(PEFT_PREFIX) for n in names):
        rules.append(("PEFT prefix removed", strip_peft))
    for k in (1, 2, 3):
        rules.append((f"PEFT prefix and {k} leading component(s) removed", _dropper(k)))
    best: tuple[dict[str, str], str] = ({}, "names as written")
    for label, fn in rules:
        got = attempt(fn)
        if len(got) == len(names):
            return got, [], label
        if len(got) > len(best[0]):
            best = (got, label)
    # (4) a prefix the model has: find where the first card module sits in the model
    first = strip_peft(names[0])
    prefixes = [p[: -len(first)] for p, _ in model.named_modules() if p.endswith("." + first)]
    for pre in prefixes[:8]:
        got = attempt(_prefixer(pre))
        if len(got) == len(names):
            return got, [], f"prefix {pre!r} added"
        if len(got) > len(best[0]):
            best = (got, f"prefix {pre!r} added")
    mapping, label = best
    return mapping, [n for n in names if n not in mapping], label


__all__ = ["PEFT_PREFIX", "lookup", "map_modules", "strip_peft"]
