"""Fitting a card to a wrapped model: its module names mapped, shapes and dtypes checked.

A card's module paths are relative to the model it was made for. They are mapped onto the
wrapped model by the first rule under which *every* module resolves: (1) as written; (2) with
a PEFT ``base_model.model.`` prefix removed; (3) with 1 to 3 leading components removed;
(4) with a prefix added that the model has. Pure functions over the module tree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loraflight.errors import EngineError

from ._lora import LoRALinear
from ._records import Plan
from .card import LoRACard, base_fingerprint
from .card.torch import TORCH_DTYPES

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


def plan_card(model: nn.Module, base_model: str | None, card: LoRACard) -> Plan:
    """Check the card against the model; all problems in one EngineError."""
    problems: list[str] = []
    hdr = card.header
    if base_model is not None and hdr.base_model is not None and hdr.base_model != base_model:
        problems.append(
            f"the card is for base model {hdr.base_model!r} but this engine serves {base_model!r}"
        )
    card_shapes = card.shapes  # (module, in, out) per row, without building the numpy rows
    mapping, missing, rule = map_modules(model, [m for m, _, _ in card_shapes])
    if missing:
        problems.append(
            f"{len(missing)} module(s) not found in the model ({rule}): "
            + ", ".join(repr(m) for m in missing[:10])
            + (" …" if len(missing) > 10 else "")
        )
    targets: dict[str, tuple[torch.device, torch.dtype]] = {}
    shapes: list[tuple[str, int, int]] = []
    for cm, fin, fout in card_shapes:
        path = mapping.get(cm)
        if path is None:
            continue
        mod = lookup(model, path)
        base = mod.base_layer if isinstance(mod, LoRALinear) else mod
        if not isinstance(base, nn.Linear):
            problems.append(f"module {path!r} is a {type(base).__name__}, not an nn.Linear")
            continue
        shapes.append((cm, int(base.in_features), int(base.out_features)))
        if (base.in_features, base.out_features) != (fin, fout):
            problems.append(
                f"module {path!r}: the card's shape (in={fin}, out={fout}) does not "
                f"fit the layer (in={base.in_features}, out={base.out_features})"
            )
            continue
        w = base.weight
        if w.dtype not in TORCH_DTYPES.values():
            problems.append(
                f"module {path!r} has {w.dtype} weights; only float32/float16/bfloat16 are supported"
            )
            continue
        targets[cm] = (w.device, w.dtype)
    if hdr.base_fingerprint is not None and not problems:
        have = base_fingerprint(shapes)
        if have != hdr.base_fingerprint:
            problems.append(
                f"base fingerprint mismatch: the card was made for a base whose targeted modules hash to "
                f"{hdr.base_fingerprint[:16]}…, this model's hash to {have[:16]}…; use the card's base "
                f"model{f' ({hdr.base_model})' if hdr.base_model else ''}"
            )
    if problems:
        shown = problems if len(problems) <= 12 else [*problems[:12], f"… and {len(problems) - 12} more"]
        raise EngineError(
            f"card {card.ref} does not fit the model; nothing was changed:\n  - " + "\n  - ".join(shown)
        )
    return Plan(mapping, targets)


__all__ = ["PEFT_PREFIX", "lookup", "map_modules", "plan_card", "strip_peft"]
