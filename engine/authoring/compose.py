"""Compose cards: weighted sums, interpolation, and parent/child stacking.

A card's delta for a module is ΔW = s · B A (s = `lora_scale`: alpha/r, or alpha/√r for rsLoRA). A weighted sum
Σ wᵢ ΔWᵢ is exact as one LoRA of rank Σ rᵢ: stack the A's and put each wᵢ sᵢ Bᵢ side by side
(scale 1). With `rank=k` the sum is re-compressed to its best rank-k approximation by SVD, without
forming the (out, in) matrix: QR of the stacked B and Aᵀ reduces the problem to an R×R SVD.
A module used by a single card keeps that card's A, B, rank and alpha unchanged (B times its
weight), so a one-card sum at weight 1 and the endpoints of an interpolation are the inputs, bit
for bit. Cards with weight 0 are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from loraflight.errors import CardError

from ..card import (
    DTYPES,
    MAX_RANK,
    CardMeta,
    LoRACard,
    ModuleLoRA,
    alpha_for_scale,
    base_fingerprint,
    lora_scale,
)
from .arrays import from_float, to_float

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def delta_weights(card: LoRACard) -> dict[str, np.ndarray]:
    """{module: s · B A} in float64: what the card adds to each Linear's weight."""
    out = {}
    for m in card:
        a, b = to_float(m.a, card.dtype), to_float(m.b, card.dtype)
        out[m.module] = m.scale(card.header.scaling) * (b @ a)
    return out


def _common_base(cards: Sequence[LoRACard]) -> str | None:
    """The one base model of all cards; a card naming none does not mix with one that names one."""
    bases = {c.header.base_model or None for c in cards}
    if len(bases) > 1:
        each = ", ".join(f"{c.ref}: {c.header.base_model or 'no base model'}" for c in cards)
        raise CardError(
            f"cards are for different base models ({each}); only cards of one base model compose "
            "(a card without one: give it the right base model when you make it, e.g. --base-model)"
        )
    return next(iter(bases), None)


def _check_shapes(cards: Sequence[LoRACard]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for c in cards:
        for m in c:
            s = (m.in_features, m.out_features)
            if shapes.setdefault(m.module, s) != s:
                raise CardError(
                    f"module {m.module!r} has shape (in={s[0]}, out={s[1]}) in {c.ref} but "
                    f"(in={shapes[m.module][0]}, out={shapes[m.module][1]}) in another card: not the same base"
                )
    return shapes


def _low_rank(bs: list[np.ndarray], as_: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-k factors (B (out,k), A (k,in)) of Σ Bᵢ Aᵢ given as stacked factors (float64)."""
    bcat = np.hstack(bs)  # (out, R)
    acat = np.vstack(as_)  # (R, in)
    qb, rb = np.linalg.qr(bcat)
    qa, ra = np.linalg.qr(acat.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    k = min(k, len(s))
    root = np.sqrt(s[:k])
    return (qb @ u[:, :k]) * root, root[:, None] * (vt[:k] @ qa.T)


def compose_add(
    cards: Sequence[LoRACard],
    weights: Sequence[float] | None = None,
    *,
    meta: CardMeta | None = None,
    name: str | None = None,
    rank: int | None = None,
    dtype: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> LoRACard:
    """One card whose delta is Σ wᵢ · ΔWᵢ (weights default to 1). Exact unless `rank=` re-compresses.

    `meta` names and describes the result (``name=`` alone is shorthand for ``CardMeta(name)``;
    the base model is the inputs' own, and `meta` may only repeat it); `key` signs it.
    """
    meta = CardMeta.given(meta, name)
    cards = list(cards)
    if not cards:
        raise CardError("compose needs at least one card")
    ws = [1.0] * len(cards) if weights is None else [float(w) for w in weights]
    if len(ws) != len(cards):
        raise CardError(f"{len(cards)} cards but {len(ws)} weights: give one weight per card")
    if not all(math.isfinite(w) for w in ws):
        raise CardError(f"weights must be finite numbers, got {ws}")
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK
    ):
        raise CardError(f"rank must be an integer in 1..{MAX_RANK}, got {rank!r}")
    base_model = _common_base(cards)
    shapes = _check_shapes(cards)
    dts = {c.dtype for c in cards}
    out_dtype = dtype or (dts.pop() if len(dts) == 1 else "float32")
    if out_dtype not in DTYPES:
        raise CardError(f"dtype {out_dtype!r} is not one of {', '.join(DTYPES)}")
    live = [(c, w) for c, w in zip(cards, ws, strict=True) if w != 0.0]
    if not live:
        raise CardError("every weight is zero: the composition would be empty")
    scalings = {c.header.scaling for c, _ in live}
    scaling = scalings.pop() if len(scalings) == 1 else "standard"

    by_module: dict[str, list[tuple[LoRACard, ModuleLoRA, float]]] = {}
    for c, w in live:
        for m in c:
            by_module.setdefault(m.module, []).append((c, m, w))
    rows: list[ModuleLoRA] = []
    for module, parts in by_module.items():
        if rank is None and len(parts) == 1:
            rows.append(_single(parts[0], scaling, out_dtype))
            continue
        bs = [w * lora_scale(m.alpha, m.rank, c.header.scaling) * to_float(m.b, c.dtype) for c, m, w in parts]
        as_ = [to_float(m.a, c.dtype) for c, m, _ in parts]
        if rank is None:
            r = sum(m.rank for _, m, _ in parts)
            if r > MAX_RANK:
                raise CardError(
                    f"module {module!r}: the exact sum has rank {r} > {MAX_RANK}; pass rank= to re-compress"
                )
            b, a = np.hstack(bs), np.vstack(as_)
        else:
            b, a = _low_rank(bs, as_, rank)
            r = a.shape[0]
        rows.append(
            ModuleLoRA(
                module,
                r,
                alpha_for_scale(1.0, r, scaling),
                from_float(a, out_dtype),
                from_float(b, out_dtype),
            )
        )
    return _build(
        rows,
        meta=_with_base(meta, base_model),
        dtype=out_dtype,
        shapes=shapes,
        scaling=scaling,
        extra={
            "composed_from": [
                {"digest": c.digest, "ref": c.ref, "weight": w} for c, w in zip(cards, ws, strict=True)
            ],
            "rank": rank,
        },
        key=key,
    )


def _single(part: tuple[LoRACard, ModuleLoRA, float], scaling: str, dtype: str) -> ModuleLoRA:
    c, m, w = part
    alpha = (
        m.alpha
        if c.header.scaling == scaling
        else alpha_for_scale(m.scale(c.header.scaling), m.rank, scaling)
    )
    if dtype == c.dtype:
        a = m.a
        b = m.b if w == 1.0 else from_float(w * to_float(m.b, c.dtype), dtype)
    else:
        a = from_float(to_float(m.a, c.dtype), dtype)
        b = from_float(w * to_float(m.b, c.dtype), dtype)
    return ModuleLoRA(m.module, m.rank, alpha, np.array(a), np.array(b))


def compose_interpolate(
    a: LoRACard,
    b: LoRACard,
    t: float,
    *,
    meta: CardMeta | None = None,
    name: str | None = None,
    rank: int | None = None,
    dtype: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> LoRACard:
    """(1 − t)·a + t·b; t = 0 gives a's modules and t = 1 b's, exactly (see `compose_add`)."""
    t = float(t)
    if not math.isfinite(t):
        raise CardError(f"t must be a finite number, got {t}")
    return compose_add([a, b], [1.0 - t, t], meta=CardMeta.given(meta, name), rank=rank, dtype=dtype, key=key)


def make_child(
    parent: LoRACard,
    modules: Iterable[ModuleLoRA] | LoRACard,
    *,
    meta: CardMeta | None = None,
    name: str | None = None,
    dtype: str | None = None,
    scaling: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> LoRACard:
    """A card stacked on `parent`: its lineage records the parent's digest, so loading it loads the parent
    under it. `modules` are the child's own rows (or another card's); shapes must agree with the parent's.
    `meta` (or just ``name=``) names the child; its base model is the parent's."""
    meta = CardMeta.given(meta, name)
    if isinstance(modules, LoRACard):
        _common_base([parent, modules])
    rows = list(modules.modules if isinstance(modules, LoRACard) else modules)
    if not rows:
        raise CardError("a child card needs at least one module")
    pshapes = {m.module: (m.in_features, m.out_features) for m in parent}
    for m in rows:
        want = pshapes.get(m.module)
        if want is not None and want != (m.in_features, m.out_features):
            raise CardError(
                f"module {m.module!r}: child shape (in={m.in_features}, out={m.out_features}) does not match "
                f"the parent's (in={want[0]}, out={want[1]})"
            )
    out_dtype = dtype or parent.dtype
    if out_dtype not in DTYPES:
        raise CardError(f"dtype {out_dtype!r} is not one of {', '.join(DTYPES)}")
    rows = [_cast_row(m, out_dtype) for m in rows]
    return _build(
        rows,
        meta=_with_base(meta, parent.header.base_model),
        dtype=out_dtype,
        shapes={m.module: (m.in_features, m.out_features) for m in rows},
        scaling=scaling or parent.header.scaling,
        lineage=(parent.digest,),
        key=key,
    )


def _cast_row(m: ModuleLoRA, dtype: str) -> ModuleLoRA:
    """Float arrays of any precision -> `dtype` (bfloat16 rows already given as uint16 words stay)."""

    def cast(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == DTYPES[dtype]:
            return x
        if not np.issubdtype(x.dtype, np.floating):
            raise CardError(f"module {m.module!r}: arrays of {x.dtype} cannot become {dtype}")
        return from_float(x, dtype)

    return ModuleLoRA(m.module, m.rank, m.alpha, cast(m.a), cast(m.b))


def _with_base(meta: CardMeta, base_model: str | None) -> CardMeta:
    """`meta` with the inputs' base model; a different one in `meta` is refused."""
    if base_model is None or meta.base_model == base_model:
        return meta
    if meta.base_model is not None:
        raise CardError(
            f"the card's metadata names base model {meta.base_model}, but the input cards are for "
            f"{base_model}; leave base_model out (a composition keeps its inputs' base model)"
        )
    return meta.replace(base_model=base_model)


def _build(
    rows: list[ModuleLoRA],
    *,
    meta: CardMeta,
    dtype: str,
    shapes: Mapping[str, tuple[int, int]],
    scaling: str,
    key: Ed25519PrivateKey | None,
    lineage: tuple[str, ...] = (),
    extra: Mapping[str, Any] | None = None,
) -> LoRACard:
    used = {m.module for m in rows}
    card = LoRACard.build(
        rows,
        **meta.as_kwargs(),
        dtype=dtype,
        base_fingerprint=base_fingerprint((mod, i, o) for mod, (i, o) in shapes.items() if mod in used),
        scaling=scaling,
        lineage=lineage,
        extra=extra,
    )
    return card.sign(key) if key is not None else card


__all__ = ["compose_add", "compose_interpolate", "delta_weights", "make_child"]
