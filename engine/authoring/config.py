"""The training config: what `train_card` does, validated all at once (no torch).

`TrainConfig.validate()` reports every invalid field together; `problems_error` is the one
format of such a multi-problem TrainingError (the config and the dataset checks use it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from loraflight.errors import TrainingError

from ..card import DTYPES, MAX_RANK, SCALINGS

KINDS = ("pairs", "completion")
PRIMARY_METRIC = {"pairs": "margin", "completion": "loss"}
HIGHER_IS_BETTER = {"margin": True, "loss": False}
# Used when target_modules is None: the attention projections of BERT- and Llama-style models.
DEFAULT_TARGETS = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj")
MAX_LISTED_PROBLEMS = 100


def problems_error(what: str, problems: list[str]) -> TrainingError:
    """One TrainingError listing `problems` under `what` (at most MAX_LISTED_PROBLEMS shown)."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f"\n  … and {more} more" if more > 0 else ""
    return TrainingError(
        f"{what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
        + "\n  ".join(shown)
        + tail
    )


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class TrainConfig:
    """How to train a card. `validate()` reports every problem at once."""

    kind: str = "pairs"  # "pairs" (contrastive, embedding model) or "completion" (causal LM)
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha; scale = alpha/r (or alpha/sqrt(r) with scaling="rslora")
    dropout: float = 0.0  # dropout on the LoRA branch's input
    target_modules: tuple[str, ...] | None = (
        None  # Linear names or name suffixes; None = attention projections
    )
    scaling: str = "standard"  # "standard" or "rslora"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 16
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimiser steps (None: all epochs)
    eval_fraction: float = 0.2  # share of records held out for the before/after evaluation
    max_length: int = 64  # tokens per text (pairs) or per prompt+completion (completion)
    temperature: float = 0.05  # InfoNCE temperature (pairs)
    grad_clip: float | None = 1.0  # max gradient norm; None = no clipping
    dtype: str = "float32"  # the card's dtype

    def validate(self) -> TrainConfig:
        """Return self, or raise TrainingError listing every invalid field."""
        p: list[str] = []

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        if self.kind not in KINDS:
            p.append(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            p.append(f"rank must be an integer in 1..{MAX_RANK}, got {self.rank!r}")
        if not is_num(self.alpha) or self.alpha <= 0:
            p.append(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not is_num(self.dropout) or not 0 <= self.dropout < 1:
            p.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            tm = self.target_modules
            if isinstance(tm, str) or not isinstance(tm, Sequence) or not tm:
                p.append("target_modules must be a non-empty list of module names (or None for the default)")
            elif not all(isinstance(t, str) and t.strip() for t in tm):
                p.append(f"target_modules must hold non-empty strings, got {list(tm)!r}")
        if self.scaling not in SCALINGS:
            p.append(f"scaling {self.scaling!r} is not one of {', '.join(SCALINGS)}")
        if not is_num(self.learning_rate) or not 0 < self.learning_rate <= 1:
            p.append(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            p.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_int(self.epochs) or not 1 <= self.epochs <= 10_000:
            p.append(f"epochs must be an integer in 1..10000, got {self.epochs!r}")
        min_batch = 2 if self.kind == "pairs" else 1
        if not is_int(self.batch_size) or not min_batch <= self.batch_size <= 65_536:
            why = (
                " (contrastive pairs need at least 2 for in-batch negatives)" if self.kind == "pairs" else ""
            )
            p.append(f"batch_size must be an integer in {min_batch}..65536{why}, got {self.batch_size!r}")
        if not is_int(self.seed) or self.seed < 0:
            p.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            p.append(f"max_steps must be None or an integer >= 1, got {self.max_steps!r}")
        if not is_num(self.eval_fraction) or not 0 < self.eval_fraction < 1:
            p.append(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if not is_int(self.max_length) or not 4 <= self.max_length <= 8192:
            p.append(f"max_length must be an integer in 4..8192, got {self.max_length!r}")
        if not is_num(self.temperature) or self.temperature <= 0:
            p.append(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or self.grad_clip <= 0):
            p.append(f"grad_clip must be None or a number > 0, got {self.grad_clip!r}")
        if self.dtype not in DTYPES:
            p.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if p:
            raise problems_error("invalid training config", p)
        return self

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. a JSON/TOML file); unknown keys are problems too."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        kw = {k: v for k, v in raw.items() if k in known}
        if isinstance(kw.get("target_modules"), list):
            kw["target_modules"] = tuple(kw["target_modules"])
        cfg = cls(**kw)
        try:
            cfg.validate()
        except TrainingError as e:
            if unknown:
                raise TrainingError(f"{e}\n  unknown config keys: {', '.join(unknown)}") from None
            raise
        if unknown:
            raise problems_error(
                "invalid training config",
                [f"unknown config key {k!r} (known: {', '.join(sorted(known))})" for k in unknown],
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["target_modules"] is not None:
            d["target_modules"] = list(d["target_modules"])
        return d


__all__ = [
    "DEFAULT_TARGETS",
    "HIGHER_IS_BETTER",
    "KINDS",
    "MAX_LISTED_PROBLEMS",
    "PRIMARY_METRIC",
    "TrainConfig",
    "problems_error",
]
