"""Extraction by truncated SVD: planted low-rank deltas come back; reported energy matches the spectrum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraflight.engine.authoring import delta_weights, extract_card
from loraflight.engine.card import CardMeta
from loraflight.errors import CardError

from .helpers import MLP


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def test_planted_low_rank_delta_is_recovered():
    rng = np.random.default_rng(0)
    base = MLP(width=16)
    tuned = MLP(width=16)
    planted = {}
    with torch.no_grad():
        for name, r in (("lin0", 3), ("lin1", 5)):
            w = tuned.get_submodule(name).weight
            d = rng.standard_normal((w.shape[0], r)) @ rng.standard_normal((r, w.shape[1])) * 0.05
            w += torch.from_numpy(d).float()
            planted[name] = (
                tuned.get_submodule(name).weight.double().numpy()
                - base.get_submodule(name).weight.double().numpy()
            )
    res = extract_card(base, tuned, rank=5, meta=CardMeta("planted", base_model="tiny"))
    got = delta_weights(res.card)
    assert set(got) == {"lin0", "lin1"}
    assert res.unchanged == ["head"]
    for name, d in planted.items():
        rel = np.linalg.norm(got[name] - d) / np.linalg.norm(d)
        assert rel <= 1e-4, (name, rel)
    e = res.energy
    assert e["lin0"] == pytest.approx(1.0, abs=1e-9) and e["lin1"] == pytest.approx(1.0, abs=1e-9)
    ranks = {m.module: m.full_rank for m in res.modules}
    assert ranks == {"lin0": 3, "lin1": 5}
    # by energy: the smallest rank that keeps (almost) all of it is the planted rank
    res2 = extract_card(
        base.state_dict(), tuned.state_dict(), energy=0.999999, modules=["lin*"], name="planted"
    )
    assert {m.module: m.rank for m in res2.modules} == {"lin0": 3, "lin1": 5}
    assert res2.card.verify().digest == res2.card.digest


@settings(max_examples=30)
@given(
    out=st.integers(4, 24),
    inp=st.integers(4, 24),
    k=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    decay=st.floats(0.3, 0.95),
)
def test_energy_matches_the_spectrum(out, inp, k, seed, decay):
    rng = np.random.default_rng(seed)
    n = min(out, inp)
    s = np.array([decay**i for i in range(n)]) * 3
    delta = _orthonormal(rng, out, n) @ np.diag(s) @ _orthonormal(rng, inp, n).T
    base = {"layer.weight": torch.zeros(out, inp, dtype=torch.float64)}
    tuned = {"layer.weight": torch.from_numpy(delta)}
    res = extract_card(base, tuned, rank=k, name="spec")
    (m,) = res.modules
    kk = min(k, n)
    assert m.rank == kk and m.full_rank == n
    assert m.energy == pytest.approx(np.sum(s[:kk] ** 2) / np.sum(s**2), rel=1e-9)
    # the rank-k approximation error is the dropped spectrum (Eckart-Young)
    err = np.linalg.norm(delta_weights(res.card)["layer"] - delta)
    assert err == pytest.approx(np.sqrt(np.sum(s[kk:] ** 2)), rel=1e-3, abs=1e-5)
    # energy mode picks the smallest rank reaching the share
    target = float(np.sum(s[:kk] ** 2) / np.sum(s**2))
    res_e = extract_card(base, tuned, energy=target, name="spec")
    assert res_e.modules[0].rank <= kk
    assert res_e.modules[0].energy >= target - 1e-12
    if s[kk - 1] ** 2 / np.sum(s**2) > 1e-9:  # the last kept value is resolvable in float64
        assert res_e.modules[0].rank == kk


def test_other_changed_parameters_are_refused_by_name():
    base, tuned = MLP(), MLP()
    with torch.no_grad():
        tuned.lin0.weight += 0.1
        tuned.lin0.bias += 0.1
        tuned.norm.weight += 0.1
    with pytest.raises(CardError) as e:
        extract_card(base, tuned, rank=2, name="x")
    assert "lin0.bias" in str(e.value) and "norm.weight" in str(e.value)
    res = extract_card(base, tuned, rank=2, name="x", allow_other_changes=True)
    assert [m.module for m in res.modules] == ["lin0"]


def test_extract_argument_errors():
    base, tuned = MLP(), MLP()
    with pytest.raises(CardError, match="exactly one of rank= or energy="):
        extract_card(base, tuned, name="x")
    with pytest.raises(CardError, match="energy must be in"):
        extract_card(base, tuned, energy=1.5, name="x")
    with pytest.raises(CardError, match="nothing to extract"):
        extract_card(base, tuned, rank=1, name="x")
    with pytest.raises(CardError, match="match no Linear"):
        extract_card(base, tuned, rank=1, modules=["nope"], name="x")
    with pytest.raises(CardError, match="differ in structure"):
        extract_card(base, MLP(width=8).state_dict() | {"extra.weight": torch.zeros(2, 2)}, rank=1, name="x")


def test_bad_card_fields_refused_before_the_svd():
    base = MLP()
    # identical weights would end in "nothing to extract": the version is refused before that work
    with pytest.raises(CardError, match="version must be a positive integer"):
        extract_card(base, MLP(), rank=1, meta=CardMeta("x", version=0))
