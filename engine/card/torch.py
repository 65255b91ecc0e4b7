"""Card ⇄ torch: the thin torch adapter of the card format (the only module here importing torch).

Loaded lazily by whoever needs torch (`LoRACard.torch_tensors`, the engine, authoring); the
format core (`loraflight.engine.card`) imports no torch. Public helpers:

- ``card_views(card, module=None)`` → ``{module: (A, B)}`` zero-copy views of the card's buffers
  (what `LoRACard.torch_tensors` returns).

- ``card_tensors(card, device=None, dtype=None, *, scale=False)`` → ``{module: (A, B)}``
  owned tensors (A: (rank, in), B: (out, rank)); ``scale=True`` folds the module's
  LoRA scale (alpha/r or alpha/sqrt(r)) into B.
- ``copy_card_tensors(card, targets, *, check_finite=False)``: the engine's copy, each
  module to its own (device, dtype), optionally checking the copies finite.
- ``card_from_tensors(modules, *, name, alpha=None, dtype=None, **header)`` → ``LoRACard``.
- ``model_shapes(model, modules)`` / ``model_fingerprint(model, modules)``: the
  (module, in, out) triples and base fingerprint of a model's Linear layers.

Copies go batch by batch: a card's A matrices of one record batch lie end to end
in one Arrow buffer, so one ``copy_`` moves (and casts) all of them at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from loraflight.errors import CardError, EngineError

from .batches import ModuleLoRA
from .card import LoRACard
from .header import base_fingerprint, lora_scale
from .values import all_finite, check_finite

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' | 'float16' | 'bfloat16' for a torch dtype or one of those names."""
    if isinstance(dtype, str):
        if dtype not in TORCH_DTYPES:
            raise CardError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        return dtype
    if dtype not in _NAMES:
        raise CardError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    return _NAMES[dtype]


def split_views(flat: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> Sequence[torch.Tensor]:
    """Views of consecutive 2-D tensors laid end to end in the 1-D torch tensor `flat`."""
    first = shapes[0]
    if shapes.count(first) == len(shapes):  # one shape: one view and one unbind
        return flat.view(len(shapes), *first).unbind(0)
    return [t.view(s) for t, s in zip(flat.split([s[0] * s[1] for s in shapes]), shapes, strict=True)]


def card_views(card: LoRACard, module: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} as torch tensors sharing memory with the card (zero copy).

    See `LoRACard.torch_tensors`: never write into them (an opened card's are views of a
    read-only mapping); copy first.
    """
    bf16 = card.dtype == "bfloat16"
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: we only read
        if module is not None:
            if not any(module in r.names for r in card.runs):
                return out
            m = card[module]
            a, b = torch.from_numpy(m.a), torch.from_numpy(m.b)
            if bf16:
                a, b = a.view(torch.bfloat16), b.view(torch.bfloat16)
            return {m.module: (a, b)}
        tdt = TORCH_DTYPES[card.dtype]
        whole, base, size = None, 0, 1
        if card.mapping is not None:  # one tensor of card words over the whole mapping, sliced per batch
            size = tdt.itemsize
            words = np.frombuffer(card.mapping, np.uint8, card.mapping.size // size * size)
            whole = torch.from_numpy(words).view(tdt)  # the values are aligned (batch_runs checks)
            base = card.mapping.address
        for run in card.runs:
            fa, fb = run.flat_a, run.flat_b
            if whole is not None:
                oa, ob = (fa.ctypes.data - base) // size, (fb.ctypes.data - base) // size
                ta, tb = whole[oa : oa + fa.size], whole[ob : ob + fb.size]
            else:
                ta, tb = torch.from_numpy(fa), torch.from_numpy(fb)
                if bf16:
                    ta, tb = ta.view(torch.bfloat16), tb.view(torch.bfloat16)
            out.update(
                zip(
                    run.names,
                    zip(split_views(ta, run.shapes_a()), split_views(tb, run.shapes_b()), strict=True),
                    strict=True,
                )
            )
    return out


def _np_to_torch(arr: np.ndarray, card_dtype: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only map: we only read from it
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if card_dtype == "bfloat16" else t


def _filled(src: np.ndarray, card_dtype: str, tdt: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A new 1-D tensor on `dev` in `tdt` holding `src` (card words)."""
    out = torch.empty(src.size, dtype=tdt, device=dev)
    if dev.type == "cpu" and _NAMES[tdt] == card_dtype:
        # same dtype on CPU: one single-threaded numpy copy; torch's copy_ would open a
        # parallel region, which waits on busy cores on a loaded machine
        dst = out.view(torch.int16).numpy().view(np.uint16) if tdt == torch.bfloat16 else out.numpy()
        np.copyto(dst, src, casting="no")
    else:
        out.copy_(_np_to_torch(src, card_dtype))
    return out


def copy_card_tensors(
    card: LoRACard,
    targets: Mapping[str, tuple[torch.device, torch.dtype]],
    *,
    check_finite: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copy the card modules named in `targets` (card module -> (device, dtype)) into new tensors.

    A record batch whose rows all go to one (device, dtype) is copied with one copy per column
    (its A matrices lie end to end, so do its B matrices) into one new buffer each, and the
    tensors are views of those buffers. With ``check_finite=True`` every copied value is checked
    finite *in the destination* (one pass over memory that is still in cache): that covers the
    card's own values and any overflow of a narrowing cast (a float32 card into float16 layers)
    at once. A failure raises CardError naming the module.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    flags: list[torch.Tensor] = []  # device-side finiteness flags, read once at the end
    cdt = card.dtype
    for run in card.runs:
        tg = [targets.get(n) for n in run.names]
        t0 = tg[0]
        if t0 is not None and all(t == t0 for t in tg):
            dev, tdt = t0
            buf_a = _filled(run.flat_a, cdt, tdt, dev)
            buf_b = _filled(run.flat_b, cdt, tdt, dev)
            if check_finite:
                for buf in (buf_a, buf_b):
                    if buf.device.type == "cpu":
                        if not _finite_cpu(buf):
                            _raise_nonfinite(card, run.rows(), targets)
                    else:
                        flags.append(torch.isfinite(buf).all())
            av = split_views(buf_a, run.shapes_a())
            bv = split_views(buf_b, run.shapes_b())
            out.update(zip(run.names, zip(av, bv, strict=True), strict=True))
            continue
        for m, t in zip(run.rows(), tg, strict=True):
            if t is None:
                continue
            dev, tdt = t
            a = _filled(m.a.reshape(-1), cdt, tdt, dev).view(m.a.shape)
            b = _filled(m.b.reshape(-1), cdt, tdt, dev).view(m.b.shape)
            if check_finite:
                for x in (a, b):
                    if x.device.type == "cpu":
                        if not _finite_cpu(x):
                            _raise_nonfinite(card, [m], targets)
                    else:
                        flags.append(torch.isfinite(x).all())
            out[m.module] = (a, b)
    if flags and not bool(torch.stack([f.to("cpu") for f in flags]).all()):
        _raise_nonfinite(card, card.modules, targets)
    return out


def _finite_cpu(t: torch.Tensor) -> bool:
    """No NaN/Inf in a CPU tensor, scanned with numpy (a torch reduction opens a parallel region,
    which stalls on a busy 2-core host)."""
    name = _NAMES[t.dtype]
    arr = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return all_finite(arr, name)


def _raise_nonfinite(
    card: LoRACard, mods: list[ModuleLoRA], targets: Mapping[str, tuple[torch.device, torch.dtype]]
) -> None:
    """Name the first of `mods` that is not finite in the card, or whose cast overflows."""
    check_finite(card.runs, card.dtype, only={m.module for m in mods}, context=f"{card.ref}: ")
    for m in mods:
        t = targets.get(m.module)
        if t is None:
            continue
        for arr in (m.a, m.b):
            x = _np_to_torch(np.ascontiguousarray(arr), card.dtype).to(t[1])
            if not bool(torch.isfinite(x).all()):
                raise CardError(
                    f"{card.ref}: module {m.module!r} overflows to Inf when cast to the layer's "
                    f"{dtype_name(t[1])}; use a card in the model's dtype"
                )
    raise CardError(f"{card.ref}: a copied tensor is not finite")  # unreachable: a copy is exact


def card_tensors(
    card: LoRACard,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    scale: bool = False,
    modules: Iterable[str] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copy a card's A and B into fresh tensors on `device` in `dtype` (default: the card's).

    A is (rank, in_features), B is (out_features, rank), both contiguous views into
    one buffer per record batch. With ``scale=True``, B is multiplied by the module's
    LoRA scale, so ``x @ A.T @ B.T`` is the whole delta. ``modules`` restricts the copy.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    tdt = TORCH_DTYPES[dtype_name(dtype)] if dtype is not None else TORCH_DTYPES[card.dtype]
    want = set(modules) if modules is not None else None
    targets = {m.module: (dev, tdt) for m in card if want is None or m.module in want}
    out = copy_card_tensors(card, targets)
    if scale:
        scaling = card.header.scaling
        for m in card:
            got = out.get(m.module)
            s = lora_scale(m.alpha, m.rank, scaling)
            if got is not None and s != 1.0:
                got[1].mul_(s)
    return out


def tensor_to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU numpy copy of `t` and its card dtype name (bfloat16 as uint16 words)."""
    t = t.detach().to("cpu").contiguous()
    name = dtype_name(t.dtype)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).copy(), name
    return t.numpy().copy(), name


def card_from_tensors(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    name: str,
    alpha: float | Mapping[str, float] | None = None,
    dtype: torch.dtype | str | None = None,
    **header: Any,
) -> LoRACard:
    """Build a card from ``{module: (A (rank, in), B (out, rank))}`` torch tensors.

    `alpha`: one value for all modules, a per-module mapping, or None (alpha = rank,
    i.e. scale 1 under the standard rule). `dtype`: the card's dtype (default: the
    tensors'; all must agree); tensors are cast to it, bf16 stored as its raw words.
    Other keyword arguments go to ``LoRACard.build`` (version, description, tags,
    base_model, base_fingerprint, scaling, author, lineage, peft, extra, created).
    """
    if not modules:
        raise CardError("card_from_tensors needs at least one module")
    if dtype is None:
        dts = {t.dtype for ab in modules.values() for t in ab}
        if len(dts) != 1:
            raise CardError(f"tensors have several dtypes {sorted(map(str, dts))}; pass dtype=")
        target = TORCH_DTYPES[dtype_name(dts.pop())]
    else:
        target = TORCH_DTYPES[dtype_name(dtype)]
    rows = []
    for module, (a, b) in modules.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CardError(
                f"module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                "(A must be (rank, in_features), B (out_features, rank))"
            )
        rank = int(a.shape[0])
        if alpha is None:
            al = float(rank)
        elif isinstance(alpha, Mapping):
            if module not in alpha:
                raise CardError(f"module {module!r} has no alpha in the alpha mapping")
            al = float(alpha[module])
        else:
            al = float(alpha)
        na, _ = tensor_to_numpy(a.to(target))
        nb, _ = tensor_to_numpy(b.to(target))
        rows.append(ModuleLoRA(module, rank, al, na, nb))
    return LoRACard.build(rows, name=name, dtype=_NAMES[target], **header)


def resolve_linear(model: nn.Module, module: str) -> nn.Linear:
    """The nn.Linear at `module` in `model`, or EngineError saying what is there instead."""
    try:
        m = model.get_submodule(module)
    except AttributeError:
        raise EngineError(f"module {module!r} does not exist in the model") from None
    base = getattr(m, "base_layer", m)  # an engine-wrapped layer reports its base
    if not isinstance(base, nn.Linear):
        raise EngineError(f"module {module!r} is a {type(m).__name__}, not an nn.Linear")
    return base


def model_shapes(model: nn.Module, modules: Iterable[str]) -> list[tuple[str, int, int]]:
    """(module, in_features, out_features) of each named Linear in `model`."""
    out = []
    for name in modules:
        lin = resolve_linear(model, name)
        out.append((name, int(lin.in_features), int(lin.out_features)))
    return out


def model_fingerprint(model: nn.Module, modules: Iterable[str]) -> str:
    """`engine.card.base_fingerprint` of the named Linear layers of `model`."""
    return base_fingerprint(model_shapes(model, modules))


__all__ = [
    "TORCH_DTYPES",
    "card_from_tensors",
    "card_tensors",
    "card_views",
    "copy_card_tensors",
    "dtype_name",
    "model_fingerprint",
    "model_shapes",
    "resolve_linear",
    "split_views",
    "tensor_to_numpy",
]
