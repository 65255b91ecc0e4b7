"""Leases: a held digest keeps its weights for its rows across swaps and unloads.

The serving layer resolves each request to a digest at admission and leases it; these tests
pin down what it relies on: a lease row runs on exactly the leased weights (also when the
swap lands in the middle of the forward), names see a swap at once, retained weights go
when the last lease ends, and the model is pristine again after that.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from loraflight.engine import Engine, LoRACard, ModuleLoRA
from loraflight.errors import EngineError

DIM, LAYERS = 16, 3
X = torch.randn(3, DIM, generator=torch.Generator().manual_seed(5))
TOL = 1e-5


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(LAYERS):
        mods.append(nn.Linear(DIM, DIM))
        if i < LAYERS - 1:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).eval()


def card(name: str, version: int, seed: int, layers: tuple[int, ...] = tuple(range(LAYERS))) -> LoRACard:
    rng = np.random.default_rng(seed)
    mods = [
        ModuleLoRA(
            str(2 * i),
            4,
            4.0,
            (rng.standard_normal((4, DIM)) * 0.5).astype(np.float32),
            (rng.standard_normal((DIM, 4)) * 0.5).astype(np.float32),
        )
        for i in layers
    ]
    return LoRACard.build(mods, name=name, version=version)


A1, A2, B1 = card("a", 1, 1), card("a", 2, 2, layers=(0,)), card("b", 1, 3)


def reference(c: LoRACard | None) -> torch.Tensor:
    model = make_model()
    eng = Engine(model)
    with torch.no_grad():
        if c is None:
            return model(X)
        eng.load(c)
        return eng.forward_mixed([c.name] * len(X), X)


REF = {None: reference(None), A1.digest: reference(A1), A2.digest: reference(A2), B1.digest: reference(B1)}


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return (y - ref).abs().max().item() <= TOL


def test_references_differ():
    refs = list(REF.values())
    for i in range(len(refs)):
        for j in range(i + 1, len(refs)):
            assert (refs[i] - refs[j]).abs().max().item() > 1e-2


def test_a_lease_keeps_its_digest_across_a_swap_and_names_see_the_swap():
    model = make_model()
    eng = Engine(model)
    eng.load(A1)
    lease = eng.lease([A1.digest])
    eng.load(A2)  # swaps "a" in place
    assert eng.adapters["a"]["digest"] == A2.digest
    assert eng.retained == (A1.digest,)
    with torch.no_grad():
        held = eng.forward_mixed([lease.row(A1.digest)] * 3, X)
        by_name = eng.forward_mixed(["a"] * 3, X)
        mixed = eng.forward_mixed([lease.row(A1.digest), "a", None], X)
    assert close(held, REF[A1.digest]) and close(by_name, REF[A2.digest])
    assert close(mixed[0], REF[A1.digest][0]) and close(mixed[1], REF[A2.digest][1])
    assert close(mixed[2], REF[None][2])
    lease.release()
    assert eng.retained == ()
    with pytest.raises(EngineError, match="released"):
        lease.row(A1.digest)
    lease.release()  # idempotent


def test_a_lease_on_a_loaded_digest_needs_no_retention_and_survives_unload():
    model = make_model()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    originals = list(model)
    eng = Engine(model)
    eng.load(A1)
    eng.load(B1)
    with eng.lease([A1.digest, B1.digest]) as lease:
        assert eng.retained == ()
        eng.unload()  # everything goes, but the leased weights stay for the lease's rows
        assert eng.adapters == {} and set(eng.retained) == {A1.digest, B1.digest}
        with torch.no_grad():
            y = eng.forward_mixed(lease.rows([A1.digest, B1.digest, None]), X)
        assert close(y[0], REF[A1.digest][0]) and close(y[1], REF[B1.digest][1])
        assert close(y[2], REF[None][2])
        with pytest.raises(EngineError, match="no adapter named"):
            eng.forward_mixed(["a"] * 3, X)
    assert eng.retained == ()
    assert all(a is b for a, b in zip(model, originals, strict=True))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in pristine.items())


def test_lease_errors():
    eng = Engine(make_model())
    eng.load(A1)
    with pytest.raises(EngineError, match="no loaded adapter has digest"):
        eng.lease([A2.digest])
    other = Engine(make_model())
    other.load(A1)
    foreign = other.lease([A1.digest])  # held on the other engine, not this one
    eng.unload("a")
    with pytest.raises(EngineError, match="no lease holds"):
        eng.forward_mixed([foreign.row(A1.digest)] * 3, X)
    foreign.release()
    with pytest.raises(EngineError, match="not held by this lease"):
        eng.lease([]).row(A1.digest)


def test_two_leases_retain_until_the_last_release():
    eng = Engine(make_model())
    eng.load(A1)
    first, second = eng.lease([A1.digest]), eng.lease([A1.digest])
    eng.load(A2)
    first.release()
    assert eng.retained == (A1.digest,)
    with torch.no_grad():
        assert close(eng.forward_mixed([second.row(A1.digest)] * 3, X), REF[A1.digest])
    second.release()
    assert eng.retained == ()
    with pytest.raises(EngineError, match="no loaded adapter"):
        eng.lease([A1.digest])


def test_a_swap_in_the_middle_of_a_forward_does_not_tear_it():
    """A gate holds the forward between layers while the name swaps and then goes."""
    model = make_model()
    eng = Engine(model)
    eng.load(A1)
    inside, go = threading.Event(), threading.Event()

    def gate(mod, args, out):
        if threading.current_thread().name == "leased-forward":
            inside.set()
            assert go.wait(10)

    model[1].register_forward_hook(gate)
    out: dict[str, torch.Tensor] = {}
    lease = eng.lease([A1.digest])

    def run() -> None:
        with torch.no_grad():
            out["y"] = eng.forward_mixed(lease.rows([A1.digest] * 3), X)

    t = threading.Thread(target=run, name="leased-forward")
    t.start()
    assert inside.wait(10)
    eng.load(A2)  # lands after layer 0 ran on A1
    eng.unload("a")
    go.set()
    t.join(10)
    assert not t.is_alive()
    assert close(out["y"], REF[A1.digest])
    lease.release()
    assert eng.retained == () and eng.adapters == {}


def test_leased_traffic_under_churn_always_matches_its_digest():
    model = make_model()
    eng = Engine(model)
    eng.load(A1)
    stop = threading.Event()
    errors: list[BaseException] = []
    results: list[tuple[str, torch.Tensor]] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(60):
                for _ in range(100):  # resolve "a" the way the serving layer does
                    info = eng.adapters.get("a")
                    if info is None:
                        continue
                    try:
                        lease = eng.lease([info["digest"]])
                    except EngineError:  # unloaded between the look-up and the lease
                        continue
                    break
                else:
                    continue
                with lease, torch.no_grad():
                    d = lease.digests[0]
                    y = eng.forward_mixed(lease.rows([d] * 3), X)
                with lock:
                    results.append((d, y))
        except BaseException as e:
            errors.append(e)

    def churn() -> None:
        try:
            i = 0
            while not stop.is_set():
                [lambda: eng.load(A2), lambda: eng.unload("a"), lambda: eng.load(A1)][i % 3]()
                i += 1
        except BaseException as e:
            errors.append(e)

    ws = [threading.Thread(target=worker, name=f"w{i}") for i in range(2)]
    ch = threading.Thread(target=churn, name="churn")
    ch.start()
    for w in ws:
        w.start()
    for w in ws:
        w.join(60)
    stop.set()
    ch.join(60)
    assert not errors, errors
    assert results
    bad = [d[:8] for d, y in results if not close(y, REF[d])]
    assert not bad, f"{len(bad)} leased forwards ran on other weights"
    assert eng.retained == ()
