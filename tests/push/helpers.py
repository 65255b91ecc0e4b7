"""Shared pieces of the api.push tests: a node that exports and pushes, PEFT checks."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from loraflight.engine.card import LoRACard
from loraflight.federation.config import NodeConfig
from loraflight.testing import TINY_BASE, node_config

INTERVAL = 0.5  # api.push_interval of these tests
WAIT = 10 * INTERVAL  # every wait for a server to be brought in line is bounded by this


def push_config(tmp: Path, fleet: str, servers: list[str], **flags: Any) -> NodeConfig:
    """A node without engine that exports cards for TINY_BASE and pushes them to `servers`."""
    return node_config(
        tmp / "store",
        fleet,
        **{
            "discovery.enabled": False,
            "trust.engine": "any",
            "export_dir": str(tmp / "export"),
            "export.model_id": TINY_BASE,
            "api.push": servers,
            "api.push_interval": INTERVAL,
            **flags,
        },
    )


def peft_outputs(files: dict[str, bytes]) -> Any:
    """Load a PEFT folder (its files' bytes) onto the tiny encoder with PEFT; its output."""
    import torch
    from peft import PeftModel

    from loraflight.engine.authoring.models import tiny_encoder

    base, _ = tiny_encoder(seed=0)
    with tempfile.TemporaryDirectory() as d:
        for name, raw in files.items():
            (Path(d) / name).write_bytes(raw)
        model = PeftModel.from_pretrained(base, d).eval()
    with torch.no_grad():
        return model, model(input_ids=_ids()).last_hidden_state


def card_outputs(card: LoRACard) -> Any:
    """The tiny encoder with the card's deltas merged by hand (W += scale * B @ A): its output."""
    import torch

    from loraflight.engine.authoring.models import tiny_encoder

    base, _ = tiny_encoder(seed=0)
    model = copy.deepcopy(base)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for m in card:
            lin = mods[m.module]
            scale = m.alpha / m.rank
            lin.weight += (
                scale * torch.from_numpy(m.b.astype("float32")) @ torch.from_numpy(m.a.astype("float32"))
            )
        return model(input_ids=_ids()).last_hidden_state


def assert_folder_is_card(files: dict[str, bytes], card: LoRACard) -> None:
    """The folder loads with PEFT to the card's exact tensors and the card's outputs."""
    import numpy as np
    import torch

    model, out = peft_outputs(files)
    params = dict(model.named_parameters())
    for m in card:
        a = params[f"base_model.model.{m.module}.lora_A.default.weight"].detach().numpy()
        b = params[f"base_model.model.{m.module}.lora_B.default.weight"].detach().numpy()
        assert np.array_equal(a, m.a) and np.array_equal(b, m.b), m.module
    assert torch.allclose(out, card_outputs(card), atol=1e-5, rtol=0)


def _ids() -> Any:
    import torch

    return (torch.arange(24).reshape(2, 12) * 7) % 4096


__all__ = ["INTERVAL", "WAIT", "assert_folder_is_card", "card_outputs", "peft_outputs", "push_config"]
