"""Verification that runs beside the load: the threaded digest, the finite check on the copied
tensors, the deferred digest/trust decision, and the zero-copy / read_into card accessors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import loraflight.engine.card.batches as batchmod
from loraflight.engine import Engine, LoRACard, ModuleLoRA
from loraflight.engine._verify import forget_verified
from loraflight.engine.card import DigestJob, compute_digest
from loraflight.engine.keys import generate, public_key_b64
from loraflight.errors import CardError, TrustError


class Big(nn.Module):
    """Two 512-wide layers: a rank-64 fp32 card on both is 512 KiB, above the threaded-hash size."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.l0 = nn.Linear(512, 512, dtype=dtype)
        self.l1 = nn.Linear(512, 512, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(self.l0(x))


def big_card(name: str = "big", seed: int = 0, scale: float = 0.01, **kw) -> LoRACard:
    rng = np.random.default_rng(seed)
    mods = [
        ModuleLoRA(
            m,
            64,
            64.0,
            (rng.standard_normal((64, 512)) * scale).astype(np.float32),
            (rng.standard_normal((512, 64)) * scale).astype(np.float32),
        )
        for m in ("l0", "l1")
    ]
    return LoRACard.build(mods, name=name, **kw)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return list(now) == list(sd) and all(torch.equal(now[k], v) for k, v in sd.items())


def test_threaded_digest_equals_the_reference_and_cancel_is_safe() -> None:
    card = big_card()
    assert card.tensor_nbytes >= 256 << 10
    want = compute_digest(card.header, card.modules)
    assert want == card.digest
    for gather in (0, 1000, 1 << 30):
        assert card.digest_job(gather=gather, threaded=True).result() == want
        assert card.digest_job(threaded=False).result() == want
    assert DigestJob(card.header, card.modules).result() == want
    job = card.digest_job(gather=0, threaded=True)
    job.cancel()
    try:  # a cancelled job either finished first or says it was cancelled
        assert job.result() == want
    except CardError as e:
        assert "cancelled" in str(e)


def test_tampered_big_card_file_is_refused_and_not_remembered(tmp_path: Path) -> None:
    model = Big().eval()
    sd = state(model)
    card = big_card()
    raw = bytearray(card.to_bytes())
    idx = raw.find(card["l1"].b.tobytes()[:16])
    raw[idx + 3] ^= 0x01  # a finite value, one bit off
    path = tmp_path / "t.lora.arrow"
    path.write_bytes(bytes(raw))
    eng = Engine(model)
    forget_verified()
    for _ in range(2):  # the failure is not remembered as verified
        with pytest.raises(CardError, match="digest mismatch"):
            eng.load(path)
        assert eng.adapters == {} and same_state(model, sd)
    # the intact file loads, and a reload is a memo hit with the same result
    good = card.write(tmp_path / "g.lora.arrow")
    eng.load(good)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y1 = model(x)
    eng.unload()
    eng.load(good)
    with torch.no_grad():
        assert torch.equal(model(x), y1)
    eng.unload()
    assert same_state(model, sd)


def test_nan_in_a_big_card_is_named_and_nothing_changes(tmp_path: Path) -> None:
    model = Big().eval()
    sd = state(model)
    card = big_card()
    a = card["l1"].a.copy()
    a[5, 7] = np.inf
    bad = LoRACard.build([card["l0"], ModuleLoRA("l1", 64, 64.0, a, card["l1"].b)], name="bad")
    eng = Engine(model)
    with pytest.raises(CardError, match="'l1': lora_a has NaN or Inf"):
        eng.load(bad.write(tmp_path / "bad.lora.arrow"))
    assert eng.adapters == {} and same_state(model, sd)


def test_narrowing_cast_overflow_is_refused() -> None:
    model = Big(torch.float16).eval()
    sd = state(model)
    card = big_card(scale=1e6)  # finite in float32, Inf in float16
    eng = Engine(model)
    with pytest.raises(CardError, match="overflows to Inf"):
        eng.load(card)
    assert eng.adapters == {} and same_state(model, sd)


def test_swap_of_a_merged_adapter_with_a_tampered_card_keeps_the_old(tmp_path: Path) -> None:
    model = Big().eval()
    eng = Engine(model)
    eng.load(big_card("m", seed=1))
    eng.merge("m")
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    v2 = big_card("m", seed=2, version=2)
    raw = bytearray(v2.to_bytes())
    raw[raw.find(v2["l0"].a.tobytes()[:16]) + 2] ^= 0x01
    path = tmp_path / "m2.lora.arrow"
    path.write_bytes(bytes(raw))
    with pytest.raises(CardError, match="digest mismatch"):
        eng.load(path, name="m")
    assert eng.adapters["m"]["version"] == 1 and eng.merged == ("m",)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_digest_mismatch_is_reported_before_trust(tmp_path: Path) -> None:
    key = generate()
    card = big_card("s").sign(key)
    raw = bytearray(card.to_bytes())
    raw[raw.find(card["l0"].b.tobytes()[:16]) + 1] ^= 0x01
    path = tmp_path / "s.lora.arrow"
    path.write_bytes(bytes(raw))
    eng = Engine(Big().eval())
    other = public_key_b64(generate().public_key())
    with pytest.raises(CardError, match="digest mismatch"):
        eng.load(path, trust=[other])
    with pytest.raises(TrustError):
        eng.load(card, trust=[other])
    assert eng.load(card, trust=[public_key_b64(key.public_key())]) == "s"


def test_torch_views_and_read_into(tmp_path: Path) -> None:
    saved = batchmod.BATCH_TARGET_BYTES
    batchmod.BATCH_TARGET_BYTES = 12 << 10  # several batches, mixed shapes in one batch
    try:
        rng = np.random.default_rng(3)
        mods = [
            ModuleLoRA(
                f"m{i}",
                r,
                2.0,
                rng.standard_normal((r, fi)).astype(np.float16),
                rng.standard_normal((fo, r)).astype(np.float16),
            )
            for i, (r, fi, fo) in enumerate(
                [(4, 256, 128), (4, 256, 128), (8, 64, 300), (2, 1000, 1000), (4, 256, 128)]
            )
        ]
        card = LoRACard.open(LoRACard.build(mods, name="tv").write(tmp_path / "tv.lora.arrow"))
        assert len(card.batches) > 1
    finally:
        batchmod.BATCH_TARGET_BYTES = saved
    views = card.torch_tensors()
    dst = {
        m.module: (torch.empty(m.a.shape, dtype=torch.float16), torch.empty(m.b.shape, dtype=torch.float16))
        for m in mods
    }
    card.read_into(dst)
    for m in mods:
        a, b = views[m.module]
        assert a.data_ptr() == card[m.module].a.ctypes.data  # zero copy
        assert torch.equal(a, torch.from_numpy(m.a)) and torch.equal(b, torch.from_numpy(m.b))
        assert torch.equal(dst[m.module][0], a) and torch.equal(dst[m.module][1], b)
    assert set(card.torch_tensors("m2")) == {"m2"} and card.torch_tensors("nope") == {}
    with pytest.raises(CardError, match="shape"):
        card.read_into({**dst, "m0": (torch.empty(3, 3, dtype=torch.float16), dst["m0"][1])})
    with pytest.raises(CardError, match="dtype"):
        card.read_into({**dst, "m0": (dst["m0"][0].float(), dst["m0"][1])})
    with pytest.raises(CardError, match="no destination"):
        card.read_into({k: v for k, v in dst.items() if k != "m4"})


def test_read_into_reads_the_opened_file_even_after_it_is_replaced(tmp_path: Path) -> None:
    first, second = big_card("r", seed=1), big_card("r", seed=2, version=2)
    path = first.write(tmp_path / "r.lora.arrow")
    opened = LoRACard.open(path)
    dst = {m.module: (np.empty_like(m.a), np.empty_like(m.b)) for m in first}
    opened.read_into(dst)  # unchanged file: read with preadv
    assert all(np.array_equal(dst[m.module][0], m.a) and np.array_equal(dst[m.module][1], m.b) for m in first)
    second.write(path)  # replaced by rename: the opened card still reads its own bytes
    for a, b in dst.values():
        a.fill(0)
        b.fill(0)
    opened.read_into(dst)
    assert all(np.array_equal(dst[m.module][0], m.a) and np.array_equal(dst[m.module][1], m.b) for m in first)
