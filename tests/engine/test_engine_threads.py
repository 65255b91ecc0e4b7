"""Live traffic: loads, swaps, merges and unloads while other threads run forwards.

A forward hook sleeps inside every layer, so forwards are always in flight while
the engine changes; every output must equal one of the legal configurations'.
The second test removes the per-forward capture and shows that this check then
catches torn forwards, so the first test does test the snapshot.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from torch import nn

from loraflight.engine import Engine, LoRACard, ModuleLoRA

DIM, LAYERS = 16, 4
X = torch.randn(4, DIM, generator=torch.Generator().manual_seed(3))
TOL = 1e-4


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(LAYERS):
        mods.append(nn.Linear(DIM, DIM))
        if i < LAYERS - 1:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).eval()


def card(name: str, version: int, seed: int) -> LoRACard:
    rng = np.random.default_rng(seed)
    mods = [
        ModuleLoRA(
            str(2 * i),
            4,
            4.0,
            (rng.standard_normal((4, DIM)) * 0.5).astype(np.float32),
            (rng.standard_normal((DIM, 4)) * 0.5).astype(np.float32),
        )
        for i in range(LAYERS)
    ]
    return LoRACard.build(mods, name=name, version=version)


A1, A2, B = card("a", 1, 1), card("a", 2, 2), card("b", 1, 3)

# One cycle of operations; the comment is the configuration after each.
OPS = [
    lambda e: e.load(A1),  # {a1}
    lambda e: e.load(B),  # {a1, b}
    lambda e: e.load(A2),  # {a2, b}: swap in place
    lambda e: e.unload("b"),  # {a2}
    lambda e: e.merge("a"),  # {a2} merged
    lambda e: e.unmerge(),  # {a2}
    lambda e: e.deactivate("a"),  # {}
    lambda e: e.activate("a"),  # {a2}
    lambda e: e.unload("a"),  # {}
]


def legal_outputs() -> list[torch.Tensor]:
    model = make_model()
    eng = Engine(model)
    outs = []
    with torch.no_grad():
        outs.append(model(X))
        for op in OPS:
            op(eng)
            outs.append(model(X))
    return outs


def add_sleepy_hooks(model: nn.Module) -> None:
    def nap(mod, args, out):
        time.sleep(0.0003)

    for m in model:
        if isinstance(m, nn.Tanh):  # between layers (wrapped Linears are replaced, so not on them)
            m.register_forward_hook(nap)


def run_traffic(eng: Engine, model: nn.Module, forwards_per_thread: int, min_ops: int) -> tuple[list, int]:
    outputs: list[torch.Tensor] = []
    lock = threading.Lock()
    done = threading.Event()
    errors: list[BaseException] = []
    ops_done = 0

    def forwards() -> None:
        try:
            for _ in range(forwards_per_thread):
                with torch.no_grad():
                    y = model(X)
                with lock:
                    outputs.append(y)
        except BaseException as e:
            errors.append(e)

    def changes() -> None:
        nonlocal ops_done
        try:
            deadline = time.monotonic() + 60
            i = 0
            while (not done.is_set() or ops_done < min_ops) and time.monotonic() < deadline:
                OPS[i % len(OPS)](eng)
                i += 1
                ops_done += 1
                time.sleep(0.0002)
            while i % len(OPS):  # finish the cycle: nothing loaded at the end
                OPS[i % len(OPS)](eng)
                i += 1
        except BaseException as e:
            errors.append(e)

    fw = [threading.Thread(target=forwards, name=f"fw{i}") for i in range(2)]
    ch = threading.Thread(target=changes, name="changes")
    ch.start()
    for t in fw:
        t.start()
    for t in fw:
        t.join(60)
    done.set()
    ch.join(60)
    assert not errors, errors
    return outputs, ops_done


def distance_to_legal(y: torch.Tensor, legal: list[torch.Tensor]) -> float:
    return min((y - ref).abs().max().item() for ref in legal)


def test_every_forward_sees_a_whole_adapter_set():
    legal = legal_outputs()
    distinct = [legal[0], legal[1], legal[2], legal[3], legal[4]]
    for i in range(len(distinct)):
        for j in range(i + 1, len(distinct)):
            assert (distinct[i] - distinct[j]).abs().max().item() > 100 * TOL
    model = make_model()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    originals = list(model)
    add_sleepy_hooks(model)
    eng = Engine(model)
    outputs, ops = run_traffic(eng, model, forwards_per_thread=100, min_ops=50)
    assert len(outputs) == 200 and ops >= 50, (len(outputs), ops)
    worst = max(distance_to_legal(y, legal) for y in outputs)
    assert worst <= TOL, f"a forward saw a torn adapter set (off by {worst})"
    seen = {min(range(len(legal)), key=lambda k, y=y: (y - legal[k]).abs().max().item()) for y in outputs}
    assert len({0, 1, 2, 3, 4} & seen) >= 2  # traffic really crossed configurations
    # the last op unloaded everything and no forward is in flight: originals are back
    assert eng.adapters == {}
    assert all(a is b for a, b in zip(model, originals, strict=True))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in pristine.items())


class _NoCapture:
    """Stands in for the engine's context variable: never captures, so layers read the live state."""

    def get(self):
        return None

    def set(self, value):
        return object()

    def reset(self, token):
        return None


def test_without_a_snapshot_the_check_catches_torn_forwards():
    legal = legal_outputs()
    model = make_model()
    add_sleepy_hooks(model)
    eng = Engine(model)
    eng._shared.var = _NoCapture()  # type: ignore[assignment]
    torn = 0
    for _ in range(5):  # bounded: scheduling decides how often a forward straddles a change
        outputs, _ = run_traffic(eng, model, forwards_per_thread=100, min_ops=50)
        torn += sum(distance_to_legal(y, legal) > TOL for y in outputs)
        if torn:
            break
    assert torn > 0


def test_concurrent_changes_from_several_threads_stay_consistent():
    model = make_model()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    eng = Engine(model)
    errors: list[BaseException] = []

    def churn(c: LoRACard, name: str) -> None:
        try:
            for _ in range(20):
                eng.load(c, name=name)
                with torch.no_grad():
                    model(X)
                eng.unload(name)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(c, n)) for c, n in ((A1, "x"), (A2, "y"), (B, "z"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert eng.adapters == {}
    assert all(isinstance(m, (nn.Linear, nn.Tanh)) for m in model)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in pristine.items())
