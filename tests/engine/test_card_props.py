"""Property tests: any card round-trips bitwise; any single-field change changes the digest."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from loraflight.engine.card import DTYPES, CardHeader, LoRACard, ModuleLoRA, compute_digest

BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"  # refused in new headers
_WORD = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}
_EXP = {"float32": 0x7F800000, "float16": 0x7C00, "bfloat16": 0x7F80}

module_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}(\.[A-Za-z0-9_]{1,8}){0,4}", fullmatch=True)
card_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}(\.[A-Za-z0-9_-]{1,6})?", fullmatch=True)
digests = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
texts = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | texts
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_val = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3), max_leaves=8
)


def _finite_words(rng: np.random.Generator, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    """Arbitrary bit patterns with the exponent kept off all-ones: every finite value, -0.0 and subnormals."""
    w = _WORD[dtype]
    words = rng.integers(0, np.iinfo(w).max, size=shape, dtype=w, endpoint=True)
    exp = w(_EXP[dtype])
    bad = (words & exp) == exp
    words[bad] ^= w(_EXP[dtype] & (_EXP[dtype] >> 1))  # clear the exponent's top bit: finite
    return words if dtype == "bfloat16" else words.view(DTYPES[dtype])


@st.composite
def cards(draw: st.DrawFn) -> LoRACard:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    names = draw(st.lists(module_names, min_size=1, max_size=5, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mods = []
    for name in names:
        r = draw(st.integers(1, 8))
        fin, fout = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        alpha = draw(st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([0.0, -0.0, 16.0, 1e-300]))
        mods.append(
            ModuleLoRA(
                name, r, alpha, _finite_words(rng, dtype, (r, fin)), _finite_words(rng, dtype, (fout, r))
            )
        )
    extra = draw(st.dictionaries(st.from_regex(r"x_[a-z]{1,6}", fullmatch=True), json_val, max_size=2))
    return LoRACard.build(
        mods,
        name=draw(card_names),
        version=draw(st.integers(1, 2**53 - 1)),
        dtype=dtype,
        # any text a new card may hold: no control characters but newline and tab, no bidi controls
        description=draw(
            st.text(
                st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=BIDI)
                | st.sampled_from("\n\t"),
                max_size=60,
            )
        ),
        tags=draw(st.lists(st.from_regex(r"[a-z0-9][a-z0-9 _:-]{0,10}", fullmatch=True), max_size=4)),
        base_model=draw(st.none() | st.from_regex(r"[A-Za-z0-9/_.-]{1,30}", fullmatch=True)),
        base_fingerprint=draw(st.none() | digests),
        scaling=draw(st.sampled_from(["standard", "rslora"])),
        author=draw(st.from_regex(r"[ -~]{0,20}", fullmatch=True)),
        created=draw(st.sampled_from(["", "2026-01-01T00:00:00Z"])),
        lineage=draw(st.lists(digests, max_size=3)),
        peft=draw(st.none() | st.dictionaries(texts, json_val, max_size=3)),
        extra=extra,
    )


def _same_bits(x: np.ndarray, y: np.ndarray) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@given(cards())
def test_round_trip_through_file_and_table(card: LoRACard) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = card.write(Path(d) / "c.lora.arrow")
        for got in (
            LoRACard.open(path),
            LoRACard.from_table(pa.ipc.open_file(pa.py_buffer(card.to_bytes())).read_all()),
        ):
            assert got.header == card.header
            assert got.header.to_json() == card.header.to_json()
            assert got.verify().digest == card.digest
            assert len(got) == len(card)
            for m, g in zip(card, got, strict=True):
                assert (g.module, g.rank, g.in_features, g.out_features) == (
                    m.module,
                    m.rank,
                    m.in_features,
                    m.out_features,
                )
                assert math.copysign(1, g.alpha) == math.copysign(1, m.alpha) and g.alpha == m.alpha
                assert _same_bits(g.a, m.a) and _same_bits(g.b, m.b)
            del got


def _header_changes(h: CardHeader) -> list[dict[str, Any]]:
    return [
        {"name": h.name + "x" if len(h.name) < 128 else "y"},
        {"version": h.version + 1 if h.version < 2**53 - 1 else 1},
        {"dtype": next(d for d in DTYPES if d != h.dtype)},
        {"description": h.description + "."},
        {"tags": (*h.tags, "new-tag")},
        {"base_model": (h.base_model or "") + "m"},
        {"base_fingerprint": "0" * 64 if h.base_fingerprint != "0" * 64 else "1" * 64},
        {"scaling": "rslora" if h.scaling == "standard" else "standard"},
        {"author": h.author + "a"},
        {"created": h.created + "Z"},
        {"lineage": (*h.lineage, "f" * 64)},
        {"peft": {**(h.peft or {}), "zz_new": 1}},
        {"format": "1.9"},
        {"extra": {**h.extra, "x_other": None}},
    ]


@given(cards(), st.data())
def test_every_single_field_change_changes_the_digest(card: LoRACard, data: st.DataObject) -> None:
    h, mods = card.header, card.modules
    base = compute_digest(h, mods)
    assert base == card.digest
    for change in _header_changes(h):
        assert compute_digest(dataclasses.replace(h, **change), mods) != base, change
    i = data.draw(st.integers(0, len(mods) - 1), label="row")
    m = mods[i]

    def with_row(new: ModuleLoRA) -> str:
        return compute_digest(h, [*mods[:i], new, *mods[i + 1 :]])

    assert with_row(dataclasses.replace(m, module=m.module + "x")) != base
    assert with_row(dataclasses.replace(m, alpha=float(np.nextafter(m.alpha, np.inf)))) != base
    if m.alpha == 0.0:
        assert (
            with_row(dataclasses.replace(m, alpha=-m.alpha if math.copysign(1, m.alpha) > 0 else 0.0)) != base
        )
    # the same bytes read with other shapes: rank and in_features swapped, then out_features and rank
    a2 = np.ascontiguousarray(m.a).reshape(m.in_features, m.rank)
    if m.in_features <= 8 and m.out_features * m.rank % m.in_features == 0:
        b2 = np.ascontiguousarray(m.b).reshape(m.out_features * m.rank // m.in_features, m.in_features)
        if (a2.shape, b2.shape) != (m.a.shape, m.b.shape):
            assert with_row(ModuleLoRA(m.module, m.in_features, m.alpha, a2, b2)) != base
    for which in ("a", "b"):
        arr = np.array(getattr(m, which))
        flat = arr.reshape(-1).view(np.uint8)
        k = data.draw(st.integers(0, flat.size - 1), label=f"{which} byte")
        flat[k] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        assert with_row(dataclasses.replace(m, **{which: arr})) != base
    # the order of rows is part of the digest
    if len(mods) > 1:
        assert compute_digest(h, mods[::-1]) != base
