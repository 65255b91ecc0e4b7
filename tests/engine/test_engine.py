"""Engine behaviour on tiny models built in the test: load, swap, unload, merge, mixed, lineage, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from loraflight.engine import Engine, LoRACard, ModuleLoRA
from loraflight.engine.card import base_fingerprint
from loraflight.engine.card.torch import card_from_tensors, card_tensors, model_fingerprint
from loraflight.engine.keys import generate, public_key_b64
from loraflight.errors import CardError, EngineError, TrustError


class MLP(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 24, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin0 = nn.Linear(dim, hidden, dtype=dtype)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, dim, dtype=dtype)
        self.norm = nn.LayerNorm(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin1(self.act(self.lin0(x))))


class Wrapper(nn.Module):
    """An outer model whose module names carry a `model.` prefix."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(seed)
    return MLP(dtype=dtype).eval()


def lora_mods(
    model: nn.Module, modules: list[str], rank: int, seed: int, prefix: str = ""
) -> list[ModuleLoRA]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in modules:
        lin = model.get_submodule(m)
        a = torch.randn(rank, lin.in_features, generator=g) * 0.3
        b = torch.randn(lin.out_features, rank, generator=g) * 0.3
        out.append(ModuleLoRA(prefix + m, rank, 2.0 * rank, a.numpy(), b.numpy()))
    return out


def make_card(model: nn.Module, name: str = "a", seed: int = 1, rank: int = 4, **kw) -> LoRACard:
    modules = kw.pop("modules", ["lin0", "lin1"])
    prefix = kw.pop("prefix", "")
    return LoRACard.build(lora_mods(model, modules, rank, seed, prefix), name=name, **kw)


def reference(model: nn.Module, cards: list[LoRACard], x: torch.Tensor) -> torch.Tensor:
    """Plain-torch expectation: each Linear adds Σ scale·B·A·x over `cards` (hooks, no engine)."""
    handles = []
    for name, mod in model.named_modules():
        deltas = []
        for c in cards:
            for m in c:
                if m.module == name:
                    a = torch.from_numpy(np.array(m.a)).float()
                    b = torch.from_numpy(np.array(m.b)).float()
                    deltas.append((a, b, m.scale(c.header.scaling)))
        if deltas:

            def hook(mod, args, out, deltas=deltas):
                x = args[0]
                return out + sum(s * (x.float() @ a.t() @ b.t()) for a, b, s in deltas).to(out.dtype)

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_pristine(model: nn.Module, sd: dict[str, torch.Tensor], mods: dict[str, nn.Module]) -> None:
    now = model.state_dict()
    assert list(now) == list(sd)
    for k, v in sd.items():
        assert now[k].dtype == v.dtype
        assert torch.equal(now[k].view(torch.uint8), v.view(torch.uint8)), k
    for name, m in mods.items():
        assert model.get_submodule(name) is m


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))


def test_load_matches_reference_and_unload_is_pristine():
    model = make_mlp()
    sd, mods = snapshot_state(model), {"lin0": model.lin0, "lin1": model.lin1}
    with torch.no_grad():
        base_out = model(X)
    card = make_card(model)
    eng = Engine(model)
    assert eng.load(card) == "a"
    assert eng.active == ("a",)
    with torch.no_grad():
        out = model(X)
    assert not torch.allclose(out, base_out)
    ref = reference(make_mlp(), [card], X)
    assert (out - ref).abs().max().item() <= 1e-5
    # state_dict keys do not change while loaded
    assert list(model.state_dict()) == list(sd)
    info = eng.adapters["a"]
    assert info["digest"] == card.digest and info["active"] and not info["merged"]
    assert info["modules"] == ("lin0", "lin1") and info["dtype"] == "float32" and info["device"] == "cpu"
    eng.unload("a")
    assert eng.adapters == {}
    with torch.no_grad():
        assert torch.equal(model(X), base_out)
    assert_pristine(model, sd, mods)


def test_activate_deactivate_and_several_adapters():
    model = make_mlp()
    ca, cb = make_card(model, "a", seed=1), make_card(model, "b", seed=2, rank=2, modules=["lin1"])
    eng = Engine(model)
    eng.load(ca)
    eng.load(cb, activate=False)
    assert eng.active == ("a",)
    with torch.no_grad():
        only_a = model(X)
    eng.activate("b")
    assert eng.active == ("a", "b")
    with torch.no_grad():
        both = model(X)
    assert (both - reference(make_mlp(), [ca, cb], X)).abs().max().item() <= 1e-5
    eng.activate("b", exclusive=True)
    assert eng.active == ("b",)
    with torch.no_grad():
        assert (model(X) - reference(make_mlp(), [cb], X)).abs().max().item() <= 1e-5
    eng.deactivate()
    assert eng.active == ()
    with torch.no_grad():
        assert torch.equal(model(X), reference(make_mlp(), [], X))
    eng.activate("a")
    with torch.no_grad():
        assert torch.equal(model(X), only_a)
    with pytest.raises(EngineError, match="no adapter named 'zz'"):
        eng.activate("zz")


def test_swap_newer_version_in_place():
    model = make_mlp()
    eng = Engine(model)
    eng.load(make_card(model, "a", seed=1, version=1))
    wrapped = model.lin0
    v2 = make_card(model, "a", seed=5, version=2, rank=8)
    eng.load(v2)
    assert model.lin0 is wrapped  # no new modules
    assert eng.adapters["a"]["version"] == 2 and list(eng.adapters) == ["a"]
    with torch.no_grad():
        assert (model(X) - reference(make_mlp(), [v2], X)).abs().max().item() <= 1e-5
    # a version that does not fit leaves the old one in place
    bad = LoRACard.build(
        [ModuleLoRA("lin0", 2, 2.0, np.ones((2, 7), np.float32), np.ones((24, 2), np.float32))],
        name="a",
        version=3,
    )
    with pytest.raises(EngineError, match="lin0"):
        eng.load(bad)
    assert eng.adapters["a"]["version"] == 2


def test_merge_unmerge_unload_bitwise_fp32():
    model = make_mlp()
    sd, mods = snapshot_state(model), {"lin0": model.lin0, "lin1": model.lin1}
    eng = Engine(model)
    eng.load(make_card(model, "a"))
    with torch.no_grad():
        unmerged = model(X)
    eng.merge("a")
    assert eng.adapters["a"]["merged"] and eng.merged == ("a",)
    with torch.no_grad():
        merged = model(X)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    # the merged weight is what state_dict shows
    assert not torch.equal(model.state_dict()["lin0.weight"], sd["lin0.weight"])
    with pytest.raises(EngineError, match="unmerge"), eng.mixed(["a"] * 5):
        model(X)
    eng.unmerge()
    with torch.no_grad():
        assert torch.equal(model(X), unmerged)
    assert torch.equal(model.state_dict()["lin0.weight"], sd["lin0.weight"])
    eng.unload()
    assert_pristine(model, sd, mods)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_and_unload_bitwise(dtype):
    model = make_mlp(dtype=dtype)
    sd, mods = snapshot_state(model), {"lin0": model.lin0, "lin1": model.lin1}
    x = X.to(dtype)
    with torch.no_grad():
        base_out = model(x)
    eng = Engine(model)
    card = make_card(model, "a")  # float32 card: cast once to the layers' dtype
    eng.load(card)
    assert eng.adapters["a"]["dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    with torch.no_grad():
        unmerged = model(x)
    ref = reference(make_mlp(dtype=dtype), [card], x)
    assert (unmerged.float() - ref.float()).abs().max().item() < 0.1
    eng.merge()
    with torch.no_grad():
        merged = model(x)
    assert (merged.float() - unmerged.float()).abs().max().item() < 0.1
    eng.unmerge()
    eng.unload()
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
    assert_pristine(model, sd, mods)


def test_bf16_card_roundtrip_through_card_from_tensors():
    model = make_mlp(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    tens = {
        "lin0": (torch.randn(4, 16, generator=g).bfloat16(), torch.randn(24, 4, generator=g).bfloat16()),
        "lin1": (torch.randn(4, 24, generator=g).bfloat16(), torch.randn(16, 4, generator=g).bfloat16()),
    }
    card = card_from_tensors(tens, name="bf", alpha=8.0, base_fingerprint=model_fingerprint(model, tens))
    assert card.dtype == "bfloat16" and card["lin0"].a.dtype == np.uint16
    back = card_tensors(card)
    for m, (a, b) in tens.items():
        assert torch.equal(back[m][0], a) and torch.equal(back[m][1], b)
    scaled = card_tensors(card, dtype=torch.float32, scale=True)
    assert torch.equal(scaled["lin0"][1], tens["lin0"][1].float() * 2.0)
    Engine(model).load(card)  # fingerprint over the model's shapes matches


def test_mixed_batch_equals_each_row_alone():
    model = make_mlp()
    ca, cb = make_card(model, "a", seed=1), make_card(model, "b", seed=2, rank=2, modules=["lin1"])
    eng = Engine(model)
    eng.load(ca)
    eng.load(cb)
    names = ["a", None, "b", "a", None]
    with torch.no_grad(), eng.mixed(names):
        out = model(X)
    out2 = eng.forward_mixed(names, X)
    assert torch.equal(out, out2.detach())
    for i, n in enumerate(names):
        expect = reference(make_mlp(), [] if n is None else [ca if n == "a" else cb], X[i : i + 1])
        assert (out[i] - expect[0]).abs().max().item() <= 1e-5, (i, n)
    # outside the block the active set applies again
    with torch.no_grad():
        assert (model(X) - reference(make_mlp(), [ca, cb], X)).abs().max().item() <= 1e-5
    with pytest.raises(EngineError, match="'zz'"), eng.mixed(["zz"]):
        pass
    with pytest.raises(EngineError, match="one name"), torch.no_grad(), eng.mixed(["a", "b"]):
        model(X)


def test_errors_leave_model_untouched():
    model = make_mlp()
    sd, mods = snapshot_state(model), {"lin0": model.lin0, "lin1": model.lin1}
    eng = Engine(model, base_model="org/base")
    # fingerprint mismatch
    fp = base_fingerprint([("lin0", 16, 99), ("lin1", 24, 16)])
    with pytest.raises(EngineError, match="fingerprint mismatch"):
        eng.load(make_card(model, "fp", base_fingerprint=fp))
    # missing module and wrong shape reported together
    mods_bad = [
        *lora_mods(model, ["lin0"], 4, 1),
        ModuleLoRA("lin9", 2, 2.0, np.zeros((2, 16), np.float32), np.zeros((16, 2), np.float32)),
        ModuleLoRA("lin1", 2, 2.0, np.zeros((2, 5), np.float32), np.zeros((16, 2), np.float32)),
        ModuleLoRA("act", 2, 2.0, np.zeros((2, 16), np.float32), np.zeros((16, 2), np.float32)),
    ]
    with pytest.raises(EngineError) as ei:
        eng.load(LoRACard.build(mods_bad, name="bad"))
    msg = str(ei.value)
    assert (
        "'lin9'" in msg
        and "'lin1'" in msg
        and "in=5" in msg
        and "ReLU" in msg
        and "nothing was changed" in msg
    )
    # base model id
    with pytest.raises(EngineError, match="org/other"):
        eng.load(make_card(model, "other", base_model="org/other"))
    # NaN weight
    nan = lora_mods(model, ["lin0", "lin1"], 4, 1)
    a = nan[1].a.copy()
    a[0, 3] = np.nan
    nan[1] = ModuleLoRA("lin1", 4, 8.0, a, nan[1].b)
    with pytest.raises(CardError, match="lin1"):
        eng.load(LoRACard.build(nan, name="nan"))
    # a tampered digest
    card = make_card(model, "t")
    raw = bytearray(card.to_bytes())
    idx = raw.find(np.asarray(card["lin0"].a).tobytes()[:8])
    raw[idx] ^= 0x40
    import pyarrow as pa

    tampered = LoRACard.from_table(pa.ipc.open_file(pa.BufferReader(bytes(raw))).read_all())
    with pytest.raises(CardError, match="digest"):
        eng.load(tampered)
    assert eng.adapters == {}
    assert_pristine(model, sd, mods)


def test_trust_requires_signature_by_trusted_key(tmp_path):
    model = make_mlp()
    eng = Engine(model)
    key, other = generate(), generate()
    card = make_card(model, "s").sign(key)
    with pytest.raises(TrustError):
        eng.load(card, trust=[public_key_b64(other.public_key())])
    with pytest.raises(TrustError):
        eng.load(make_card(model, "u"), trust=[public_key_b64(key.public_key())])
    assert eng.load(card, trust=[public_key_b64(key.public_key())]) == "s"
    eng.unload()
    # from a file: the second load hits the verified-file memo and still checks trust
    path = card.write(tmp_path / "s.lora.arrow")
    eng.load(path, trust=[public_key_b64(key.public_key())])
    eng.unload()
    with pytest.raises(TrustError):
        eng.load(path, trust=[public_key_b64(other.public_key())])
    eng.load(path, trust=[public_key_b64(key.public_key())])


def test_prefix_mapping_rules():
    inner = make_mlp()
    outer = Wrapper(inner)
    # card made for the outer model, engine wraps the inner one
    c_outer = make_card(inner, "o", prefix="model.")
    # PEFT-style names
    c_peft = make_card(inner, "p", seed=3, prefix="base_model.model.model.")
    eng = Engine(inner)
    eng.load(c_outer)
    eng.load(c_peft)
    assert eng.adapters["o"]["modules"] == ("lin0", "lin1")
    assert eng.adapters["p"]["modules"] == ("lin0", "lin1")
    eng.unload()
    # card made for the inner model, engine wraps the outer one
    eng2 = Engine(outer)
    eng2.load(make_card(inner, "i"))
    assert eng2.adapters["i"]["modules"] == ("model.lin0", "model.lin1")
    x = X
    with torch.no_grad():
        assert (
            outer(x) - reference(Wrapper(make_mlp()), [make_card(inner, "i", prefix="model.")], x)
        ).abs().max() <= 1e-5


def test_lineage_parents_load_under_child():
    model = make_mlp()
    parent = make_card(model, "base-skill", seed=1)
    zero = [
        ModuleLoRA(m.module, 2, 4.0, np.zeros((2, m.in_features), np.float32), m.b[:, :2].copy())
        for m in parent
    ]
    child = LoRACard.build(zero, name="child", lineage=[parent.digest])
    eng = Engine(model)
    with pytest.raises(EngineError, match=parent.digest):
        eng.load(child)
    assert eng.adapters == {}
    # resolver supplies the parent: loaded inactive, marked auto
    eng.load(child, resolver={parent.digest: parent}.get)
    info = eng.adapters
    assert info["child"]["parents"] == ("base-skill",) and info["base-skill"]["auto"]
    assert eng.active == ("child",)
    with torch.no_grad():
        out = model(X)
    alone_model = make_mlp()
    Engine(alone_model).load(parent)
    with torch.no_grad():
        assert torch.equal(out, alone_model(X))  # zero child delta: bit for bit the parent alone
    assert (out - reference(make_mlp(), [parent], X)).abs().max().item() <= 1e-5
    with pytest.raises(EngineError, match="lineage parent of 'child'"):
        eng.unload("base-skill")
    # mixed rows with the child get the parent too
    with torch.no_grad(), eng.mixed(["child", None, None, None, None]):
        mixed = model(X)
    assert (mixed[0] - out[0]).abs().max() <= 1e-6
    eng.unload("child")
    assert eng.adapters == {}  # the auto parent went with it
    # an explicitly loaded parent stays after its child is unloaded
    eng.load(parent, activate=False)
    eng.load(child)
    eng.unload("child")
    assert list(eng.adapters) == ["base-skill"]


def test_max_adapters_lru():
    model = make_mlp()
    eng = Engine(model, max_adapters=2)
    eng.load(make_card(model, "a", seed=1), activate=False)
    eng.load(make_card(model, "b", seed=2), activate=False)
    eng.activate("a")  # a is now more recently used than b
    eng.load(make_card(model, "c", seed=3), activate=False)
    assert sorted(eng.adapters) == ["a", "c"] and eng.evictions == 1
    with pytest.raises(EngineError, match="max_adapters"):
        Engine(model, max_adapters=0)


def test_card_file_path_and_rslora(tmp_path):
    model = make_mlp()
    card = make_card(model, "r", scaling="rslora")
    path = card.write(tmp_path / "r.lora.arrow")
    eng = Engine(model)
    eng.load(str(path))
    with torch.no_grad():
        out = model(X)
    assert (out - reference(make_mlp(), [card], X)).abs().max().item() <= 1e-5
    assert math.isclose(card["lin0"].scale("rslora"), 8.0 / 2.0)


def test_close_removes_hooks_and_restores():
    model = make_mlp()
    sd, mods = snapshot_state(model), {"lin0": model.lin0, "lin1": model.lin1}
    eng = Engine(model)
    eng.load(make_card(model))
    eng.close()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert_pristine(model, sd, mods)


def test_verified_file_memo_rechecks_a_changed_file(tmp_path):
    model = make_mlp()
    eng = Engine(model)
    good = make_card(model, "m")
    path = good.write(tmp_path / "m.lora.arrow")
    eng.load(path)  # verified once, remembered
    eng.unload()
    eng.load(path)  # unchanged file: memo hit, loads
    eng.unload()
    # flip a tensor byte in place (same path, same size): the memo must not vouch for it
    raw = bytearray(path.read_bytes())
    idx = raw.find(np.asarray(good["lin0"].a).tobytes()[:8])
    raw[idx] ^= 0x40
    with open(path, "r+b") as f:
        f.write(bytes(raw))
    with pytest.raises(CardError, match="digest"):
        eng.load(path)
    assert eng.adapters == {}
