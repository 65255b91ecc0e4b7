"""The card package's public pieces: lora_scale, CardMeta, with_header, verify_signature, check_finite."""

from __future__ import annotations

import dataclasses
import math
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import loraflight.engine.card as cardpkg
from loraflight.engine import keys
from loraflight.engine.card import (
    CardMeta,
    LoRACard,
    ModuleLoRA,
    alpha_for_scale,
    lora_scale,
    verify_signature,
)
from loraflight.engine.card.values import check_finite
from loraflight.errors import CardError, TrustError


def _card(name: str = "parts", dtype: str = "float32") -> LoRACard:
    rng = np.random.default_rng(0)
    mods = [
        ModuleLoRA(f"layer.{i}", 2, 4.0, rng.standard_normal((2, 6)).astype(dtype), np.ones((3, 2), dtype))
        for i in range(3)
    ]
    return LoRACard.build(mods, name=name, created="2026-01-01T00:00:00Z")


# --------------------------------------------------------------------------- lora_scale


def test_lora_scale_standard_and_rslora() -> None:
    assert lora_scale(16.0, 8) == 2.0
    assert lora_scale(16.0, 8, "standard") == 2.0
    assert lora_scale(8.0, 4, "rslora") == 4.0
    assert lora_scale(3.0, 2, "rslora") == 3.0 / math.sqrt(2)
    assert ModuleLoRA("m", 4, 8.0, np.zeros((4, 1)), np.zeros((1, 4))).scale("rslora") == 4.0


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
@pytest.mark.parametrize("rank", [1, 3, 8, 64])
def test_alpha_for_scale_inverts_lora_scale(scaling: str, rank: int) -> None:
    for scale in (1.0, 0.25, 3.5):
        assert lora_scale(alpha_for_scale(scale, rank, scaling), rank, scaling) == pytest.approx(
            scale, rel=1e-15
        )
    assert alpha_for_scale(1.0, rank) == rank  # scale 1 under the standard rule: alpha = r exactly


def test_lora_scale_refuses_unknown_scaling_and_bad_rank() -> None:
    with pytest.raises(CardError, match="scaling 'dora' is not one of standard, rslora"):
        lora_scale(1.0, 2, "dora")
    for rank in (0, -1, True, 2.0):
        with pytest.raises(CardError, match="rank must be a positive integer"):
            lora_scale(1.0, rank)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CardMeta


def test_card_meta_carries_the_fields_to_build() -> None:
    meta = CardMeta("skill", version=3, description="does x", tags=["a", "b"], base_model="m/x", author="me")
    assert meta.tags == ("a", "b")
    card = LoRACard.build(_card().modules, **meta.as_kwargs())
    h = card.header
    assert (h.name, h.version, h.description, h.tags, h.base_model, h.author) == (
        "skill",
        3,
        "does x",
        ("a", "b"),
        "m/x",
        "me",
    )
    assert meta.replace(version=4).version == 4 and meta.version == 3


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"name": "../x"}, "could escape a directory"),
        ({"name": ""}, "card name must be a non-empty string"),
        ({"version": 0}, "version must be a positive integer"),
        ({"version": "1"}, "header field 'version' has type str"),
        ({"tags": ("",)}, "tags must be"),
        ({"tags": "ops"}, "tags must be a list of strings"),
        ({"description": "x" * (64 * 1024 + 1)}, "description is 65537 characters"),
        ({"author": "a\nb"}, "'author' must be printable"),
    ],
)
def test_card_meta_is_validated_on_construction(fields: dict, needle: str) -> None:
    kw = {"name": "ok", **fields}
    with pytest.raises(CardError, match=needle):
        CardMeta(**kw)
    with pytest.raises(CardError, match=needle):
        CardMeta("ok").replace(**fields)


def test_card_meta_given_takes_a_meta_or_a_name() -> None:
    meta = CardMeta("a", version=2)
    assert CardMeta.given(meta) is meta
    assert CardMeta.given(None, "b") == CardMeta("b")
    with pytest.raises(CardError, match="not both"):
        CardMeta.given(meta, "b")
    with pytest.raises(CardError, match="needs a name"):
        CardMeta.given(None)
    with pytest.raises(CardError, match="meta must be a CardMeta"):
        CardMeta.given({"name": "a"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- with_header


def test_with_header_keeps_rows_and_does_not_recompute_the_digest() -> None:
    card = _card()
    forged = card.with_header(dataclasses.replace(card.header, description="not what was hashed"))
    assert forged.header.description == "not what was hashed"
    assert forged.digest == card.digest  # the header's claim, not recomputed
    assert [m.module for m in forged] == [m.module for m in card]
    assert forged.compute_digest() != card.digest
    with pytest.raises(CardError, match="digest mismatch"):
        forged.verify()
    again = LoRACard.from_table(forged.table())
    assert again.header.description == "not what was hashed"
    # the same header gives a card that verifies
    assert card.with_header(card.header).verify().digest == card.digest


def test_with_header_refuses_another_dtype() -> None:
    card = _card()
    with pytest.raises(CardError, match="float16 card"):
        card.with_header(dataclasses.replace(card.header, dtype="float16"))


# --------------------------------------------------------------------------- verify_signature


def test_verify_signature_is_the_one_rule() -> None:
    key = keys.generate()
    pub = keys.public_key_b64(key.public_key())
    card = _card()
    signed = card.sign(key)
    h = signed.header
    assert cardpkg.check_signature is verify_signature
    assert verify_signature(h) is None  # valid, no trust decision asked
    assert verify_signature(h, [pub]) is True
    assert verify_signature(h, {h.signer}) is True  # a signer id is accepted too
    assert verify_signature(card.header) is None  # unsigned, nothing required
    with pytest.raises(TrustError, match="not a trusted key"):
        verify_signature(h, [keys.public_key_b64(keys.generate().public_key())])
    with pytest.raises(TrustError, match="is unsigned, but a signature by a trusted key is required"):
        verify_signature(card.header, require_signed=True)
    with pytest.raises(TrustError, match="is unsigned"):
        verify_signature(card.header, [pub])
    # a signature by another key over this digest does not match the claimed signer key
    other = card.sign(keys.generate()).header
    with pytest.raises(TrustError, match="bad signature"):
        verify_signature(dataclasses.replace(other, signature=h.signature))
    with pytest.raises(TrustError, match="does not match the signer key"):
        verify_signature(dataclasses.replace(h, signer="0" * 32))
    with pytest.raises(TrustError, match="malformed"):
        verify_signature(dataclasses.replace(h, signature="not base64!"))


def test_sign_takes_an_ed25519_private_key() -> None:
    with pytest.raises(TypeError, match="Ed25519PrivateKey"):
        _card().sign(keys.generate().public_key())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- check_finite


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_check_finite_names_the_module_and_honours_only(dtype: str) -> None:
    rows = _card(dtype=dtype).modules
    bad = rows[1].a.copy()
    bad[1, 2] = np.inf
    rows[1] = ModuleLoRA(rows[1].module, 2, 4.0, bad, rows[1].b)
    card = LoRACard.build(rows, name="nan")
    with pytest.raises(CardError, match=r"^ctx: module 'layer\.1': lora_a has NaN or Inf values$"):
        check_finite(card.runs, card.dtype, context="ctx: ")
    check_finite(card.runs, card.dtype, only={"layer.0", "layer.2"})  # the bad module is not asked about
    with pytest.raises(CardError, match=r"layer\.1"):
        card.check_values()


# --------------------------------------------------------------------------- boundaries


def test_the_format_core_imports_no_torch() -> None:
    code = (
        "import sys, loraflight.engine.card as c; c.LoRACard; "
        "assert 'torch' not in sys.modules, 'torch'; assert 'cryptography' not in sys.modules, 'crypto'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_card_module_declares_all() -> None:
    import importlib

    for name in ("header", "batches", "values", "digest", "ipc", "signing", "card"):
        mod = importlib.import_module(f"loraflight.engine.card.{name}")
        assert mod.__all__ and all(hasattr(mod, n) for n in mod.__all__), name
    assert all(hasattr(cardpkg, n) for n in cardpkg.__all__)


def test_keys_are_written_atomically_with_their_modes(tmp_path: Path) -> None:
    priv, pub = keys.write_keypair(tmp_path)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loraflight.key", "loraflight.pub"]  # no temp left


@pytest.mark.parametrize("name", ["header", "batches", "values", "digest", "ipc", "signing", "card"])
def test_each_card_module_imports_alone(name: str) -> None:
    """No import cycle hides behind the package's own import order."""
    subprocess.run([sys.executable, "-c", f"import loraflight.engine.card.{name}"], check=True)
