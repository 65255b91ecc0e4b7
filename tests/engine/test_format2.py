"""Card format 2 (BLAKE3 pieces): the byte-exact vectors of docs/format.md section 11, format-1
fixtures written by the old writer, the upgrade round trip, and bad pieces named by index."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

import loraflight.engine.card.batches as batchmod
from loraflight.engine import Engine
from loraflight.engine._verify import forget_verified
from loraflight.engine.card import (
    READ_MAJORS,
    CardDigest,
    CardHeader,
    LoRACard,
    ModuleLoRA,
    base_fingerprint,
    header_digest,
    upgrade_pair,
    verify_piece,
)
from loraflight.errors import CardError, TrustError

FIXTURES = Path(__file__).with_name("fixtures")
DOCS_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
DOCS_PUB = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
V1_DIGESTS = {  # the sha256 digests the format-1 writer gave them (fixtures/README.md)
    "v1-unsigned": "9d0eb47b0f9537a4d89f9d9cc5d239200b008d055ea267bc491c17a231a291c0",
    "v1-signed": "9d0eb47b0f9537a4d89f9d9cc5d239200b008d055ea267bc491c17a231a291c0",
    "v1-f16-signed": "585b140be7b749429d08bfad44b5bb4bdbc40e0c76542429a765a88f94324737",
    "v1-multibatch-signed": "9fbfe0d0d545100ef25f6740887cdb8cecaccccd34191a36b153e9905fcf4e25",
}


def canon(o: object) -> bytes:
    return json.dumps(o, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def multi_piece(monkeypatch: pytest.MonkeyPatch, n: int = 5, seed: int = 0) -> LoRACard:
    """A format-2 card of `n` pieces (one module per record batch)."""
    monkeypatch.setattr(batchmod, "BATCH_TARGET_BYTES", 300)
    rng = np.random.default_rng(seed)
    mods = [
        ModuleLoRA(
            f"model.layers.{i}.self_attn.q_proj",
            2,
            4.0,
            rng.standard_normal((2, 16)).astype(np.float32),
            rng.standard_normal((16, 2)).astype(np.float32),
        )
        for i in range(n)
    ]
    card = LoRACard.build(mods, name="pieces", created="2026-01-01T00:00:00Z")
    assert len(card.batches) == len(card.header.pieces) == n
    return card


# --------------------------------------------------------------------------- test vectors


def test_docs_format2_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/format.md section 11, recomputed from the rules alone (blake3, struct, JSON)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    fp = base_fingerprint([("layer.q", 2, 2)])
    p0 = (
        b"loraflight-piece-v2\x00"
        + struct.pack("<QQQ", 0, 0, 1)
        + b"\x07float32"
        + struct.pack("<I", 7)
        + b"layer.q"
        + struct.pack("<IdQQ", 1, 2.0, 2, 2)
        + struct.pack("<Q", 8)
        + struct.pack("<2f", 0.5, -1.0)
        + struct.pack("<Q", 8)
        + struct.pack("<2f", 2.0, 0.25)
    )
    assert len(p0) == 123
    piece0 = blake3.blake3(p0).hexdigest()
    assert piece0 == "5ff96fbca20018cce94b17ed3acd2a8090090a4ebff13f864161d02de7adbff6"
    fields = {
        "author": "",
        "base_fingerprint": fp,
        "base_model": None,
        "created": "2026-01-01T00:00:00Z",
        "description": "",
        "dtype": "float32",
        "format": "2.0",
        "lineage": [],
        "name": "demo",
        "pieces": [[0, 1, piece0]],
        "scaling": "standard",
        "tags": [],
        "version": 1,
    }
    head = canon(fields)
    assert len(head) == 354
    digest = blake3.blake3(b"loraflight-card-v2\x00" + struct.pack("<Q", len(head)) + head).hexdigest()
    assert digest == "04bc6b2708e91b55d2a1aa5a68a03bc27e7c449d085076df549e2e09ac238568"
    sig = base64.b64encode(DOCS_KEY.sign(b"loraflight-sig-v1\x00" + bytes.fromhex(digest))).decode()
    for value in (p0.hex()[:40], piece0, head.decode(), digest, sig):
        assert value in doc.replace(" ", "").replace("\n", "") or value in doc

    a = np.array([[0.5, -1.0]], dtype=np.float32)
    b = np.array([[2.0], [0.25]], dtype=np.float32)
    q = ModuleLoRA("layer.q", 1, 2.0, a, b)
    card = LoRACard.build([q], name="demo", created="2026-01-01T00:00:00Z", base_fingerprint=fp)
    assert card.header.signed_part() == json.loads(head) and card.digest == digest
    signed = LoRACard.open(card.sign(DOCS_KEY).write(tmp_path / "demo.lora.arrow"))
    assert signed.header.signature == sig and signed.format_major == 2
    assert signed.verify(trusted=[DOCS_PUB]).digest == digest

    # piece 1 of a two-piece card: index and first row are hashed
    p1 = (
        b"loraflight-piece-v2\x00"
        + struct.pack("<QQQ", 1, 1, 1)
        + b"\x07float32"
        + struct.pack("<I", 7)
        + b"layer.v"
        + struct.pack("<IdQQ", 1, 1.0, 2, 1)
        + struct.pack("<Q", 8)
        + struct.pack("<2f", 1.0, 2.0)
        + struct.pack("<Q", 4)
        + struct.pack("<f", -0.5)
    )
    piece1 = blake3.blake3(p1).hexdigest()
    assert piece1 == "df508785ccde12951d57b438872f8632c130d52dda782b3017c9713a5f067892" and piece1 in doc
    assert p1.hex()[40:88] in doc.replace(" ", "").replace("\n", "")
    monkeypatch.setattr(batchmod, "BATCH_TARGET_BYTES", 8)
    v = ModuleLoRA("layer.v", 1, 1.0, np.array([[1.0, 2.0]], np.float32), np.array([[-0.5]], np.float32))
    two = LoRACard.build([q, v], name="demo2", created="2026-01-01T00:00:00Z")
    assert two.header.pieces == ((0, 1, piece0), (1, 1, piece1))
    h2 = canon(
        {**fields, "name": "demo2", "base_fingerprint": None, "pieces": [[0, 1, piece0], [1, 1, piece1]]}
    )
    d2 = blake3.blake3(b"loraflight-card-v2\x00" + struct.pack("<Q", len(h2)) + h2).hexdigest()
    assert (
        two.digest == d2 == "2c7624a7f9f134f732ddc3fa0f27889740e02d88e86af64962a59a736731e54c" and d2 in doc
    )

    # the upgrade of section 9's format-1 card
    old = LoRACard.build([q], name="demo", created="2026-01-01T00:00:00Z", base_fingerprint=fp, major=1)
    assert old.digest == "a9817c8de3c4ee295f9f96746eb7b15169b1c946d326845abef29140aed9525f"
    hu = canon({**fields, "upgraded_from": old.digest})
    du = blake3.blake3(b"loraflight-card-v2\x00" + struct.pack("<Q", len(hu)) + hu).hexdigest()
    assert old.upgrade().digest == du == "5ffd89c27d24aa1f7b6e46cc371a48361f1f0ccceb429b3edc4d8dacaef4dfc4"
    assert hu.decode() in doc and du in doc


# --------------------------------------------------------------------------- format-1 fixtures


class Tower(nn.Module):
    """model.layers.{i}.self_attn.q_proj: the module paths of the fixtures."""

    def __init__(self, n: int, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.ModuleDict(
            {
                "layers": nn.ModuleList(
                    [
                        nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(width, width)})})
                        for _ in range(n)
                    ]
                )
            }
        )

    def q(self, i: int) -> nn.Linear:
        return self.model["layers"][i]["self_attn"]["q_proj"]  # type: ignore[index,return-value]


@pytest.mark.parametrize("name", sorted(V1_DIGESTS))
def test_format1_fixtures_open_verify_and_upgrade(name: str) -> None:
    card = LoRACard.open(FIXTURES / f"{name}.lora.arrow")
    assert card.format_major == 1 and card.header.format == "1.0" and 1 in READ_MAJORS
    v = card.verify(trusted=[DOCS_PUB]) if "signed" in name and "unsigned" not in name else card.verify()
    assert v.digest == card.digest == V1_DIGESTS[name]
    assert card.compute_digest() == V1_DIGESTS[name]
    if v.signed:
        assert v.signer == "56475aa75463474c0285df5dbf2bcab7" and v.trusted
    up = card.upgrade(DOCS_KEY)
    assert up.format_major == 2 and len(up.header.pieces) == len(card.batches)
    assert up.header.upgraded_from == card.digest != up.digest
    assert up.verify(trusted=[DOCS_PUB]).digest == up.digest == header_digest(up.header)


@pytest.mark.parametrize("name", ["v1-unsigned", "v1-signed", "v1-multibatch-signed"])
def test_format1_fixtures_hot_load(name: str) -> None:
    card = LoRACard.open(FIXTURES / f"{name}.lora.arrow")
    model = Tower(len(card)).eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = [model.q(i)(x) for i in range(len(card))]
    eng = Engine(model)
    forget_verified()
    trust = [DOCS_PUB] if "unsigned" not in name else None
    eng.load(FIXTURES / f"{name}.lora.arrow", trust=trust)
    with torch.no_grad():
        for i, m in enumerate(card):
            want = (
                base[i]
                + m.scale(card.header.scaling)
                * (x @ torch.from_numpy(m.a.copy()).T)
                @ torch.from_numpy(m.b.copy()).T
            )
            torch.testing.assert_close(model.q(i)(x), want, rtol=1e-5, atol=1e-5)
    eng.unload()
    with torch.no_grad():
        assert all(torch.equal(model.q(i)(x), base[i]) for i in range(len(card)))


# --------------------------------------------------------------------------- upgrade


def test_upgrade_round_trip(tmp_path: Path) -> None:
    old = LoRACard.open(FIXTURES / "v1-multibatch-signed.lora.arrow")
    new = LoRACard.open(old.upgrade(DOCS_KEY).write(tmp_path / "up.lora.arrow"))
    assert new.format_major == 2 and new.header.format == "2.0"
    assert new.header.upgraded_from == old.digest and new.digest != old.digest
    assert [m.module for m in new] == [m.module for m in old]
    for a, b in zip(old, new, strict=True):
        assert (a.rank, a.alpha) == (b.rank, b.alpha)
        assert np.array_equal(a.a, b.a) and np.array_equal(a.b, b.b)
    assert [b.num_rows for b in new.batches] == [b.num_rows for b in old.batches]  # nothing re-batched
    same = {k: v for k, v in old.header.signed_part().items() if k != "format"}
    assert {k: v for k, v in new.header.signed_part().items() if k in same} == same
    assert new.verify(trusted=[DOCS_PUB]).trusted
    assert upgrade_pair(old.header, new.header) and upgrade_pair(new.header, old.header)
    other = old.upgrade(Ed25519PrivateKey.generate())
    assert not upgrade_pair(old.header, other.header)  # another signer's upgrade is not the pair
    # upgraded_from is covered by the signature: changing it breaks the digest
    forged = new.with_header(dataclasses.replace(new.header, upgraded_from="ab" * 32))
    with pytest.raises(CardError, match="digest mismatch"):
        forged.verify()
    with pytest.raises(CardError, match="already format 2"):
        new.upgrade()


def test_upgrade_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loraflight.engine.keys import write_keypair
    from loraflight.federation.cli import main

    src = FIXTURES / "v1-signed.lora.arrow"
    out = tmp_path / "up.lora.arrow"
    assert main(["card", "upgrade", str(src), str(out)]) == 1
    assert "pass --key" in capsys.readouterr().err
    priv, _ = write_keypair(tmp_path / "k")
    assert main(["card", "upgrade", str(src), str(out), "--key", str(priv)]) == 0
    said = capsys.readouterr().out
    assert "format 2.0" in said and V1_DIGESTS["v1-signed"] in said
    assert main(["card", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_major"] == 2 and info["pieces"] == 1 and info["verified"]
    assert info["header"]["upgraded_from"] == V1_DIGESTS["v1-signed"]
    assert main(["card", "inspect", str(src)]) == 0
    assert "format 1" in capsys.readouterr().out


# --------------------------------------------------------------------------- pieces


def _flip_in_piece(card: LoRACard, data: bytes, index: int, which: int) -> bytearray:
    run = card.runs[index]
    raw = (run.flat_a if which == 0 else run.flat_b).tobytes()
    pos = data.find(raw)
    assert pos > 0
    bad = bytearray(data)
    bad[pos + len(raw) // 2] ^= 0x01  # one mantissa bit: still finite
    return bad


def test_one_flipped_bit_in_any_piece_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = multi_piece(monkeypatch)
    data = card.to_bytes()
    n = len(card.header.pieces)
    forget_verified()
    for i in range(n):
        for which in (0, 1):
            path = tmp_path / f"bad-{i}-{which}.lora.arrow"  # a fresh file each time: no cache helps
            path.write_bytes(_flip_in_piece(card, data, i, which))
            bad = LoRACard.open(path)
            with pytest.raises(CardError, match=f"digest mismatch: piece {i} of {n} "):
                bad.verify()
            with pytest.raises(CardError, match=f"piece {i} of {n}"):
                Engine(Tower(n).eval()).load(path)
            for j, batch in enumerate(bad.batches):  # each piece verifies alone
                if j == i:
                    with pytest.raises(CardError, match=f"piece {i} of {n}"):
                        verify_piece(bad.header, j, batch)
                else:
                    assert verify_piece(bad.header, j, batch) == card.header.pieces[j][2]


def test_verify_piece_alone_in_any_order(monkeypatch: pytest.MonkeyPatch) -> None:
    card = multi_piece(monkeypatch, n=4, seed=3)
    header = CardHeader.from_json(card.header.to_json())  # all a receiver needs
    for i in reversed(range(4)):
        assert verify_piece(header, i, card.batches[i]) == header.pieces[i][2]
    with pytest.raises(CardError, match="piece 1 of 4"):
        verify_piece(header, 1, card.batches[2])  # right rows count, wrong position
    with pytest.raises(CardError, match="does not exist"):
        verify_piece(header, 4, card.batches[0])
    old = LoRACard.open(FIXTURES / "v1-unsigned.lora.arrow")
    with pytest.raises(CardError, match="no pieces"):
        verify_piece(old.header, 0, old.batches[0])


def test_streaming_digest_refuses_a_bad_piece_as_it_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    card = multi_piece(monkeypatch, n=4, seed=5)
    d = CardDigest(card.header, len(card))
    for b in card.batches:
        d.update_batch(b)
    assert d.hexdigest() == card.digest
    reader = pa.ipc.open_file(pa.py_buffer(bytes(_flip_in_piece(card, card.to_bytes(), 1, 1))))
    d = CardDigest(card.header, len(card))
    d.update_batch(reader.get_batch(0))  # piece 0 passes
    with pytest.raises(CardError, match="piece 1 of 4"):
        d.update_batch(reader.get_batch(1))  # refused before pieces 2 and 3 arrive
    d = CardDigest(card.header, len(card))
    d.update_batch(card.batches[0])
    with pytest.raises(CardError, match="received 1 of 4 pieces"):
        d.hexdigest()
    with pytest.raises(CardError, match="rows advertised"):
        CardDigest(card.header, len(card) + 1)


def test_rebatched_card_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    card = multi_piece(monkeypatch, n=3)
    merged = pa.Table.from_batches(card.batches).combine_chunks().to_batches()
    assert len(merged) == 1
    with pytest.raises(CardError, match="re-batched"):
        LoRACard(card.header, merged)


def test_header_tampering_and_piece_list_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    card = multi_piece(monkeypatch, n=2)
    d = card.header.to_dict()
    with pytest.raises(CardError, match="needs 'pieces'"):
        CardHeader.from_dict({k: v for k, v in d.items() if k != "pieces"})
    with pytest.raises(CardError, match="pieces must cover"):
        CardHeader.from_dict({**d, "pieces": [d["pieces"][1], d["pieces"][0]]})
    with pytest.raises(CardError, match="upgraded_from"):
        CardHeader.from_dict({**d, "upgraded_from": "nope"})
    # a piece hash swapped for another valid one: the header digest no longer matches
    p = d["pieces"]
    forged = CardHeader.from_dict({**d, "pieces": [[p[0][0], p[0][1], p[1][2]], p[1]]})
    with pytest.raises(CardError, match="piece 0 of 2"):
        card.with_header(forged).verify()
    recomputed = card.with_header(forged).content_header()
    assert recomputed.pieces == card.header.pieces and recomputed.digest == card.digest


def test_signature_over_a_format2_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    card = multi_piece(monkeypatch, n=2).sign(DOCS_KEY)
    assert card.verify(trusted=[DOCS_PUB]).trusted
    with pytest.raises(TrustError, match="not a trusted key"):
        card.verify(trusted=["0" * 32])
