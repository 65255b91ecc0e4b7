"""Extract a card from a base and a fine-tuned model by truncated SVD of each Linear weight delta.

For each adapted module ΔW = W_tuned − W_base (out, in) = U S Vᵀ; keeping the top k singular
values gives B = U_k √S_k (out, k), A = √S_k V_kᵀ (k, in), alpha = k (scale 1), so B·A is the best
rank-k approximation of ΔW (Eckart–Young). k is fixed (`rank=`) or the smallest rank whose
singular values keep a share `energy` of ‖ΔW‖²_F = Σ s². The kept share is reported per module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from loraflight.errors import CardError

from ..card import DTYPES, MAX_RANK, CardMeta, LoRACard, ModuleLoRA, alpha_for_scale, base_fingerprint
from .arrays import from_float

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModuleExtraction:
    module: str
    rank: int
    energy: float  # share of ‖ΔW‖²_F kept by the rank-`rank` approximation, in [0, 1]
    full_rank: int  # numerical rank of ΔW at the weights' own precision
    delta_norm: float  # ‖ΔW‖_F


@dataclasses.dataclass
class ExtractResult:
    card: LoRACard
    modules: list[ModuleExtraction]
    unchanged: list[str]  # Linear weights whose delta is exactly zero (left out of the card)

    @property
    def energy(self) -> dict[str, float]:
        return {m.module: m.energy for m in self.modules}


def _as_weights(obj: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """({module: weight (out, in) float64}, {other param name: array}, machine epsilon of the
    weights' own dtype) from a model or a state dict."""
    import torch

    eps = float(np.finfo(np.float64).eps)

    def note(t: Any) -> None:
        nonlocal eps
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            eps = max(eps, float(torch.finfo(t.dtype).eps))
        elif isinstance(t, np.ndarray) and np.issubdtype(t.dtype, np.floating):
            eps = max(eps, float(np.finfo(t.dtype).eps))

    if isinstance(obj, torch.nn.Module):
        weights, other = {}, {}
        linear_names = {n for n, m in obj.named_modules() if isinstance(m, torch.nn.Linear) and n}
        for name, t in obj.state_dict().items():
            mod, _, leaf = name.rpartition(".")
            arr = t.detach().to("cpu", torch.float64).numpy()
            if mod in linear_names and leaf == "weight":
                weights[mod] = arr
                note(t)
            else:
                other[name] = arr
        return weights, other, eps
    if not isinstance(obj, Mapping):
        raise CardError(f"expected a torch.nn.Module or a state dict, got {type(obj).__name__}")
    weights, other = {}, {}
    for name, t in obj.items():
        arr = (
            t.detach().to("cpu", torch.float64).numpy()
            if isinstance(t, torch.Tensor)
            else np.asarray(t, np.float64)
        )
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and arr.ndim == 2 and mod:
            weights[mod] = arr
            note(t)
        else:
            other[name] = arr
    return weights, other, eps


def _pick_rank(s: np.ndarray, rank: int | None, energy: float | None) -> int:
    total = float(np.sum(s**2))
    if rank is not None:
        return min(rank, len(s))
    assert energy is not None
    cum = np.cumsum(s**2) / total
    # a few ulps of slack so a share computed the same way elsewhere is reached, not missed by rounding
    return min(int(np.searchsorted(cum, energy * (1 - 4 * np.finfo(np.float64).eps))) + 1, len(s))


def extract_card(
    base: Any,
    tuned: Any,
    *,
    rank: int | None = None,
    energy: float | None = None,
    modules: Iterable[str] | None = None,
    meta: CardMeta | None = None,
    name: str | None = None,
    dtype: str = "float32",
    allow_other_changes: bool = False,
    key: Ed25519PrivateKey | None = None,
) -> ExtractResult:
    """Make a card whose B·A approximate each Linear weight delta between `base` and `tuned`.

    `base`/`tuned` are torch modules or state dicts of the same architecture. Give exactly one of
    `rank` (fixed) or `energy` (in (0, 1]: smallest rank keeping that share of the delta's energy).
    `modules` restricts to names or glob patterns. Other changed parameters (biases, LayerNorm,
    embeddings) cannot be represented by a card: they are refused, by name, unless
    `allow_other_changes=True` (then they are logged and left out). `meta` names and describes the
    card (``name=`` alone is shorthand for ``CardMeta(name)``); `key` signs it.
    """
    meta = CardMeta.given(meta, name)
    problems = []
    if (rank is None) == (energy is None):
        problems.append("give exactly one of rank= or energy=")
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK
    ):
        problems.append(f"rank must be an integer in 1..{MAX_RANK}, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1
    ):
        problems.append(f"energy must be in (0, 1], got {energy!r}")
    if dtype not in DTYPES:
        problems.append(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if problems:
        raise CardError("cannot extract: " + "; ".join(problems))
    bw, bo, beps = _as_weights(base)
    tw, to, teps = _as_weights(tuned)
    eps = max(beps, teps)
    mismatch = sorted(set(bw) ^ set(tw)) + sorted(set(bo) ^ set(to))
    if mismatch:
        raise CardError(f"base and tuned models differ in structure: only one has {', '.join(mismatch[:10])}")
    for m in bw:
        if bw[m].shape != tw[m].shape:
            raise CardError(
                f"module {m!r}: base weight {bw[m].shape} and tuned weight {tw[m].shape} differ in shape"
            )
    pats = list(modules) if modules is not None else None
    selected = [m for m in bw if pats is None or any(m == p or fnmatch.fnmatchcase(m, p) for p in pats)]
    if pats is not None:
        unmatched = [p for p in pats if not any(m == p or fnmatch.fnmatchcase(m, p) for m in bw)]
        if unmatched:
            raise CardError(f"modules {', '.join(map(repr, unmatched))} match no Linear weight")
    changed_other = [n for n in bo if bo[n].shape != to[n].shape or not np.array_equal(bo[n], to[n])]
    changed_other += [m + ".weight" for m in bw if m not in selected and not np.array_equal(bw[m], tw[m])]
    if changed_other:
        msg = (
            f"these changed parameters cannot be represented by a LoRA card: {', '.join(changed_other[:20])}"
        )
        if not allow_other_changes:
            raise CardError(
                msg + " (to leave them out of the card: --allow-other-changes on the command line, "
                "allow_other_changes=True in Python)"
            )
        log.warning("%s; left out", msg)

    rows: list[ModuleLoRA] = []
    report: list[ModuleExtraction] = []
    unchanged: list[str] = []
    shapes = []
    for m in selected:
        delta = tw[m] - bw[m]
        norm = float(np.linalg.norm(delta))
        if norm == 0.0:
            unchanged.append(m)
            continue
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        k = _pick_rank(s, rank, energy)
        total = float(np.sum(s**2))
        kept = float(np.sum(s[:k] ** 2)) / total
        # numerical rank at the precision the weights were stored in
        tol = s[0] * max(delta.shape) * eps
        root = np.sqrt(s[:k])
        b = u[:, :k] * root  # (out, k)
        a = root[:, None] * vt[:k]  # (k, in)
        alpha = alpha_for_scale(1.0, k)  # scale 1: B·A is the approximation itself
        rows.append(ModuleLoRA(m, k, alpha, from_float(a, dtype), from_float(b, dtype)))
        report.append(ModuleExtraction(m, k, kept, int(np.sum(s > tol)), norm))
        shapes.append((m, delta.shape[1], delta.shape[0]))
    if not rows:
        raise CardError("base and tuned weights are identical in every selected Linear: nothing to extract")
    card = LoRACard.build(
        rows,
        **meta.as_kwargs(),
        dtype=dtype,
        base_fingerprint=base_fingerprint(shapes),
        scaling="standard",
        extra={"extraction": {"rank": rank, "energy": energy}},
    )
    if key is not None:
        card = card.sign(key)
    return ExtractResult(card, report, unchanged)


__all__ = ["ExtractResult", "ModuleExtraction", "extract_card"]
