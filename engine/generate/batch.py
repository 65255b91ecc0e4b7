"""One decode step for many requests: left-padded KV caches, the attention mask, positions (pure).

Theory of operation
-------------------
Each request keeps its own KV cache: per layer a ``(K, V)`` pair of shape
``(1, kv_heads, L_i, head_dim)``, where ``L_i`` is how many of its tokens the model has
seen (keys are stored already rotated by their true positions, so where they sit in a
padded tensor does not change them). A decode step feeds every request its one pending
token. `pack` builds the batch: caches left-padded to ``L = max L_i`` into
``(B, kv_heads, L, head_dim)``; row i's new token goes at index ``L`` (the model appends
it), its position id is ``L_i`` (its own next position, not ``L``), and the additive
attention mask ``(B, 1, 1, L + 1)`` is 0 on row i's own ``L_i`` keys and its new one, and
the dtype's most negative value on the ``L - L_i`` pads, which softmax turns into exact
zeros: each row attends over exactly what it would alone. `unpack` cuts each row's
``L_i + 1`` keys back out of the grown cache (views: nothing is copied until the next
`pack`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from loraflight.errors import EngineError

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (K, V), each (1, heads, L, head_dim)


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """The model inputs of one decode step over `len(lengths)` requests."""

    input_ids: torch.Tensor  # (B, 1) each row's pending token
    position_ids: torch.Tensor  # (B, 1) each row's own next position (= its cache length)
    attention_mask: torch.Tensor  # (B, 1, 1, L + 1) additive: 0 attend, dtype min for pads
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each (B, heads, L, head_dim)
    lengths: tuple[int, ...]  # L_i
    width: int  # L


def cache_length(kv: KV) -> int:
    """How many tokens a request's cache holds."""
    return int(kv[0][0].shape[-2]) if kv else 0


def decode_mask(
    lengths: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B, 1, 1, L + 1) additive mask for left-padded caches of `lengths` plus one new token each."""
    width = max(lengths)
    lens = torch.tensor(list(lengths), dtype=torch.long, device=device)
    cols = torch.arange(width + 1, device=device)
    pad = cols.unsqueeze(0) < (width - lens).unsqueeze(1)  # (B, L + 1): True on the pads
    mask = torch.zeros(pad.shape, dtype=dtype, device=device)
    mask.masked_fill_(pad, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def pack(caches: Sequence[KV], tokens: Sequence[int]) -> Packed:
    """The batch of one decode step: each request's cache and its pending token."""
    if not caches or len(caches) != len(tokens):
        raise EngineError(f"pack: {len(caches)} caches for {len(tokens)} tokens (one each, at least one)")
    n_layers = len(caches[0])
    if any(len(c) != n_layers for c in caches):
        raise EngineError("pack: caches from models with different numbers of layers")
    lengths = tuple(cache_length(c) for c in caches)
    width = max(lengths)
    k0 = caches[0][0][0]
    device, dtype = k0.device, k0.dtype
    layers = []
    for li in range(n_layers):
        kk, vv = caches[0][li]
        k_out = kk.new_zeros((len(caches), kk.shape[1], width, kk.shape[3]))
        v_out = vv.new_zeros((len(caches), vv.shape[1], width, vv.shape[3]))
        for i, c in enumerate(caches):
            k, v = c[li]
            n = lengths[i]
            k_out[i, :, width - n :].copy_(k[0])
            v_out[i, :, width - n :].copy_(v[0])
        layers.append((k_out, v_out))
    return Packed(
        input_ids=torch.tensor([[int(t)] for t in tokens], dtype=torch.long, device=device),
        position_ids=torch.tensor([[n] for n in lengths], dtype=torch.long, device=device),
        attention_mask=decode_mask(lengths, dtype, device),
        layers=layers,
        lengths=lengths,
        width=width,
    )


def unpack(grown: Sequence[tuple[torch.Tensor, torch.Tensor]], lengths: Sequence[int]) -> list[KV]:
    """Per request, its cache after the step: its own L_i keys and the new one (views)."""
    width = max(lengths)
    out = []
    for i, n in enumerate(lengths):
        out.append(tuple((k[i : i + 1, :, width - n :], v[i : i + 1, :, width - n :]) for k, v in grown))
    return out


__all__ = ["KV", "Packed", "cache_length", "decode_mask", "pack", "unpack"]
