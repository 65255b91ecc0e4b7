"""The LoRA-wrapped Linear and the per-forward snapshot it reads.

Theory of operation
-------------------
The engine never writes into a model's weights. It replaces each targeted
``nn.Linear`` by a ``LoRALinear`` that *registers the original Parameter
objects under the same names* (``weight``, ``bias``), so ``state_dict()`` keys do
not change, and keeps the original module aside to put it back on unload.

Everything a wrapped layer needs to compute lives in an immutable ``Snapshot``:
per layer (by slot key) the weight to use (the original, or a merged copy) and
the unmerged LoRA deltas as ``(A, B, scale)``, applied one after the other
(``y.addmm_(x A^T, B^T, alpha=scale)``) so that a zero delta changes no bit. The engine
builds a new snapshot for every change and swaps one reference; a forward
pre-hook on the model captures the current snapshot in a context variable for
the whole forward, so a forward in flight sees the whole old or the whole new
adapter set, never half of one.

Per layer the unmerged path costs one GEMM for the base, a thin ``x @ A.T``
(rank columns) and an in-place ``addmm_`` of ``(x A^T) B^T`` into the output:
no extra pass over the output. Mixed batches gather each row's (A, B·scale) from
a stack built once per snapshot (row 0 is zeros, for base rows) and use ``bmm`` +
``baddbmm_``: no Python loop over rows.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Delta = tuple[torch.Tensor, torch.Tensor, float]  # (A (r, in), B (out, r), scale)


@dataclass(frozen=True)
class Slot:
    """One wrapped layer's view of one snapshot."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    deltas: tuple[Delta, ...]  # active, unmerged adapters, applied in order (lineage parents first)
    per_adapter: dict[str, tuple[Delta, ...]]  # adapter name -> its deltas (lineage parents first)


@dataclass(eq=False)
class Snapshot:
    """An immutable adapter set (by convention: never mutated once published)."""

    slots: dict[int, Slot]
    merged: bool = False
    names: frozenset[str] = frozenset()  # adapters loaded when it was built
    rows: RowPlan | None = None
    _stacks: dict[Any, Any] = field(default_factory=dict)  # memo: (slot, names) -> stacked (A, B)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock)

    def stacks(self, key: int, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A_stack (n+1, r, in), B_stack (n+1, out, r)) for `names`; index 0 is zeros (base)."""
        memo_key = (key, names)
        got = self._stacks.get(memo_key)
        if got is not None or memo_key in self._stacks:
            return got  # type: ignore[no-any-return]
        slot = self.slots[key]
        groups = [slot.per_adapter.get(n, ()) for n in names]
        result: tuple[torch.Tensor, torch.Tensor] | None = None
        if any(groups):
            r = max(sum(int(d[0].shape[0]) for d in g) for g in groups)
            a0, b0, _ = next(d for g in groups for d in g)
            a_st = a0.new_zeros((len(names) + 1, r, a0.shape[1]))
            b_st = b0.new_zeros((len(names) + 1, b0.shape[0], r))
            for i, g in enumerate(groups, start=1):
                k = 0
                for a, b, sc in g:  # a child's rows carry its parents' ranks too
                    n_r = int(a.shape[0])
                    a_st[i, k : k + n_r].copy_(a)
                    b_st[i, :, k : k + n_r].copy_(b)
                    if sc != 1.0:
                        b_st[i, :, k : k + n_r].mul_(sc)
                    k += n_r
            result = (a_st, b_st)
        with self._memo_lock:
            if len(self._stacks) > 4096:
                self._stacks.clear()
            self._stacks[memo_key] = result
        return result


@dataclass(frozen=True, eq=False)
class RowPlan:
    """A mixed batch: each row's index into `names` (+1; 0 = base), per device."""

    names: tuple[str, ...]  # distinct adapter names present, in order
    index: tuple[int, ...]  # per row: 0 for base, i+1 for names[i]
    _by_device: dict[Any, torch.Tensor] = field(default_factory=dict)

    def index_on(self, device: torch.device) -> torch.Tensor:
        t = self._by_device.get(device)
        if t is None:
            t = torch.tensor(self.index, dtype=torch.long, device=device)
            self._by_device[device] = t
        return t


class Shared:
    """What every wrapped layer of one engine reads: the current snapshot and the captured one."""

    def __init__(self) -> None:
        self.state = Snapshot(slots={})
        self.var: contextvars.ContextVar[Snapshot | None] = contextvars.ContextVar(
            "loraflight_snapshot", default=None
        )


class LoRALinear(nn.Module):
    """An nn.Linear with LoRA deltas read from the engine's per-forward snapshot."""

    def __init__(self, base: nn.Linear, key: int, shared: Shared) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", base)  # kept aside, not a submodule
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.key = key
        object.__setattr__(self, "_shared", shared)
        self.weight = base.weight  # the same Parameter objects: state_dict keys unchanged
        if base.bias is not None:
            self.bias = base.bias
        else:
            self.register_parameter("bias", None)

    base_layer: nn.Linear
    _shared: Shared

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, lora_slot={self.key}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        snap = shared.var.get()
        if snap is None:
            snap = shared.state
        slot = snap.slots.get(self.key)
        if slot is None:  # this layer is not in the snapshot the forward started with
            base = self.base_layer
            return F.linear(x, base.weight, base.bias)
        y = F.linear(x, slot.weight, slot.bias)
        rows = snap.rows
        if rows is not None:
            return _mixed(snap, self.key, rows, x, y)
        deltas = slot.deltas
        if not deltas:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        for a, b, sc in deltas:
            xa = x2 if x2.dtype == a.dtype else x2.to(a.dtype)
            if y2.dtype == b.dtype:
                y2.addmm_(xa @ a.t(), b.t(), alpha=sc)
            else:
                y2.add_(((xa @ a.t()) @ b.t()).mul_(sc).to(y2.dtype))
        return y


def _mixed(snap: Snapshot, key: int, rows: RowPlan, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    st = snap.stacks(key, rows.names)
    if st is None:  # no row's adapter touches this layer
        return y
    n = len(rows.index)
    if x.shape[0] != n:
        from loraflight.errors import EngineError

        raise EngineError(
            f"mixed batch: {n} adapter names were given but a layer received a batch of {x.shape[0]} rows; "
            "pass one name (or None) per row of the batch dimension"
        )
    a_st, b_st = st
    idx = rows.index_on(x.device)
    a_g = a_st.index_select(0, idx)  # (B, r, in)
    b_g = b_st.index_select(0, idx)  # (B, out, r)
    x3 = x.reshape(n, -1, x.shape[-1])  # (B, T, in)
    if x3.dtype != a_g.dtype:
        x3 = x3.to(a_g.dtype)
    y3 = y.view(n, -1, y.shape[-1])  # (B, T, out)
    t = torch.bmm(x3, a_g.transpose(1, 2))  # (B, T, r)
    if y3.dtype == b_g.dtype:
        y3.baddbmm_(t, b_g.transpose(1, 2))
    else:
        y3.add_(torch.bmm(t, b_g.transpose(1, 2)).to(y3.dtype))
    return y


def merged_weight(weight: torch.Tensor, deltas: list[Delta]) -> torch.Tensor:
    """weight + Σ scale·B·A, computed in float32 for 16-bit weights, into a new tensor."""
    work = weight.detach().to(torch.float32) if weight.dtype != torch.float32 else weight.detach().clone()
    for a, b, sc in deltas:
        work.addmm_(b.to(torch.float32), a.to(torch.float32), alpha=sc)
    return work.to(weight.dtype) if weight.dtype != torch.float32 else work


__all__ = ["Delta", "LoRALinear", "RowPlan", "Shared", "Slot", "Snapshot", "merged_weight"]
