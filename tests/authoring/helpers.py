"""Small models and helpers shared by the authoring tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from loraflight.engine.card import LoRACard, ModuleLoRA, base_fingerprint


class MLP(nn.Module):
    """A tiny model in the PEFT tests' style: Linear layers with biases, a LayerNorm, an embedding."""

    def __init__(self, width: int = 12, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.emb = nn.Embedding(32, width)
            self.lin0 = nn.Linear(width, 2 * width)
            self.norm = nn.LayerNorm(2 * width)
            self.lin1 = nn.Linear(2 * width, width)
            self.head = nn.Linear(width, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(1)
        return self.head(torch.relu(self.lin1(self.norm(torch.relu(self.lin0(h))))))


def random_card(
    rng: np.random.Generator,
    modules: dict[str, tuple[int, int]],
    *,
    name: str = "c",
    rank: int = 2,
    alpha: float = 4.0,
    dtype: str = "float32",
    scaling: str = "standard",
    base_model: str | None = "tiny",
) -> LoRACard:
    rows = []
    for m, (fin, fout) in modules.items():
        a = rng.standard_normal((rank, fin)).astype(np.float32)
        b = rng.standard_normal((fout, rank)).astype(np.float32)
        if dtype == "bfloat16":
            from loraflight.engine.authoring.arrays import from_float

            a, b = from_float(a, dtype), from_float(b, dtype)
        else:
            a, b = a.astype(dtype), b.astype(dtype)
        rows.append(ModuleLoRA(m, rank, alpha, a, b))
    fp = base_fingerprint((m, fin, fout) for m, (fin, fout) in modules.items())
    return LoRACard.build(
        rows, name=name, dtype=dtype, scaling=scaling, base_model=base_model, base_fingerprint=fp
    )


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(saved) and all(
        now[k].dtype == v.dtype and now[k].shape == v.shape and torch.equal(now[k], v)
        for k, v in saved.items()
    )


__all__ = ["MLP", "random_card", "same_state", "state"]
