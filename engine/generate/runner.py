"""The model calls of generation: one prefill (one request) and one decode step (many requests).

A `Runner` wraps how the model is called: `forward(names, **model_kwargs)` with row i of the
batch using adapter ``names[i]`` (None: the base). `Runner.for_engine(engine)` uses the
engine's mixed rows (`Engine.forward_mixed`), so one decode forward serves requests for
different adapters; `Runner(model)` calls the bare model (every name must be None). The
KV cache travels as plain per-layer ``(K, V)`` tensors (`batch.KV`) and is wrapped in the
model's cache class only for the call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from loraflight.errors import EngineError

from .batch import KV, Packed, unpack

Forward = Callable[..., Any]  # forward(names, **model_kwargs) -> model output with .logits


class Runner:
    """Prefill and decode calls on a causal LM, optionally through an engine's mixed rows."""

    def __init__(self, model: Any, forward: Forward | None = None) -> None:
        self.model = model
        self._forward = forward if forward is not None else self._bare
        params = inspect.signature(model.forward).parameters
        if "cache" in params:
            self._cache_kw = "cache"
        elif "past_key_values" in params:
            self._cache_kw = "past_key_values"
        else:
            raise EngineError(
                f"{type(model).__name__}.forward takes no KV cache; generation needs a causal LM"
            )
        self._keep = "logits_to_keep" in params
        self.config = getattr(model, "config", None)

    @classmethod
    def for_engine(cls, engine: Any) -> Runner:
        """A runner whose rows use the engine's adapters by name (mixed rows)."""
        return cls(engine.model, engine.forward_mixed)

    def _bare(self, names: Sequence[str | None], **kwargs: Any) -> Any:
        if any(n is not None for n in names):
            raise EngineError(
                "this runner has no engine: every request must use the base model (adapter None)"
            )
        return self.model(**kwargs)

    def _call(self, names: Sequence[str | None], cache: Any, **kwargs: Any) -> torch.Tensor:
        if self._keep:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            out = self._forward(list(names), use_cache=True, **{self._cache_kw: cache}, **kwargs)
        logits = out.logits
        return logits[:, -1, :].float()  # (B, V)

    def _new_cache(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        from transformers import DynamicCache

        return DynamicCache() if layers is None else DynamicCache(list(layers))

    @staticmethod
    def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def prefill(self, adapter: str | None, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, KV]:
        """(next-token logits (V,), the request's cache) after reading its whole prompt."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        cache = self._new_cache()
        logits = self._call([adapter], cache, input_ids=ids)
        return logits[0], tuple(self._layers_of(cache))

    def decode(self, adapters: Sequence[str | None], packed: Packed) -> tuple[torch.Tensor, list[KV]]:
        """(next-token logits (B, V), each request's grown cache) after one token per request."""
        cache = self._new_cache(packed.layers)
        logits = self._call(
            adapters,
            cache,
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            attention_mask=packed.attention_mask,
        )
        return logits, unpack(self._layers_of(cache), packed.lengths)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")


__all__ = ["Forward", "Runner"]
