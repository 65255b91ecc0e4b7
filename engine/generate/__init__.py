"""loraflight.engine.generate: text generation with per-request adapters over one causal LM.

Modules, one concept each: `sampling` (temperature, top_p, seed), `text` (incremental
detokenization, stop strings), `batch` (padded caches, masks and positions of a decode
step), `runner` (the model calls), `state` (a request's handle and state), `scheduler`
(the thread that batches the decode steps of concurrent requests), `models` (causal LMs
with their LM head, tokenizer and chat template). Importing this package loads no torch;
the names below load their module on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "CausalLM": "models",
    "GenerationHandle": "state",
    "GenerationResult": "state",
    "GenerationScheduler": "scheduler",
    "Runner": "runner",
    "SamplingParams": "sampling",
    "encode_prompt": "models",
    "load_causal_lm": "models",
    "render_chat": "models",
    "tiny_chat_llama": "models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
