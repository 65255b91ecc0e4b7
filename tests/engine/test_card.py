"""The card codec: zero copy, tampering, signatures, header versioning, bad input, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import loraflight.engine.card as cardmod
import loraflight.engine.card.batches as batchmod
import loraflight.engine.card.digest as digestmod
from loraflight.engine import keys
from loraflight.engine.card import (
    METADATA_KEY,
    CardDigest,
    CardHeader,
    LoRACard,
    ModuleLoRA,
    card_schema,
    check_name,
)
from loraflight.errors import CardError, LoraflightError, TrustError


def _mods(dtype: str = "float32", n: int = 3, rank: int = 4, fin: int = 16, fout: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.standard_normal((rank, fin)).astype(np.float32)
        b = rng.standard_normal((fout, rank)).astype(np.float32)
        if dtype == "bfloat16":
            a, b = ((x.view(np.uint32) >> 16).astype(np.uint16) for x in (a, b))
        else:
            a, b = a.astype(dtype), b.astype(dtype)
        out.append(ModuleLoRA(f"model.layers.{i}.self_attn.q_proj", rank, 8.0, a, b))
    return out


def _write_header(card: LoRACard, path: Path, **changes) -> None:
    """Rewrite `card` to `path` with header fields changed but the old digest kept (a tamperer)."""
    header = dataclasses.replace(card.header, **changes)
    schema = card_schema(header.dtype, {METADATA_KEY: header.to_json()})
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, schema) as w:
        for b in card.batches:
            w.write_batch(pa.record_batch(b.columns, schema=schema))


# --------------------------------------------------------------------------- round trip basics


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_write_open_round_trip(tmp_path: Path, dtype: str) -> None:
    mods = _mods(dtype)
    card = LoRACard.build(mods, name="rt", dtype=dtype, tags=("t1",), lineage=("a" * 64,))
    path = card.write(tmp_path / "rt.lora.arrow")
    got = LoRACard.open(path)
    assert got.header == card.header
    assert got.verify().status == "unsigned"
    for m, g in zip(mods, got, strict=True):
        assert g.module == m.module and g.rank == m.rank and g.alpha == m.alpha
        assert g.a.dtype == cardmod.DTYPES[dtype] and g.a.tobytes() == m.a.tobytes()
        assert g.b.tobytes() == m.b.tobytes()
        assert not g.a.flags.writeable


def test_torch_views_share_the_mapping(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    card = LoRACard.build(_mods("bfloat16"), name="tv", dtype="bfloat16")
    got = LoRACard.open(card.write(tmp_path / "tv.lora.arrow"))
    tensors = got.torch_tensors()
    for m in got:
        a, b = tensors[m.module]
        assert a.dtype == torch.bfloat16 and tuple(a.shape) == m.a.shape and tuple(b.shape) == m.b.shape
        assert a.data_ptr() == m.a.ctypes.data and b.data_ptr() == m.b.ctypes.data
        assert torch.equal(a.view(torch.int16), torch.from_numpy(m.a.view(np.int16).copy()))


def test_flight_path_from_table_and_incremental_digest(tmp_path: Path) -> None:
    saved = batchmod.BATCH_TARGET_BYTES
    batchmod.BATCH_TARGET_BYTES = 300
    try:
        card = LoRACard.build(_mods(n=5), name="ft")
    finally:
        batchmod.BATCH_TARGET_BYTES = saved
    assert len(card.batches) == 5
    table = pa.ipc.open_file(pa.py_buffer(card.to_bytes())).read_all()
    again = LoRACard.from_table(table)
    assert again.header == card.header
    assert again.verify().digest == card.digest
    d = CardDigest(card.header, len(card))
    for b in card.batches:
        d.update_batch(b)
    assert d.hexdigest() == card.digest
    with pytest.raises(CardError, match="schema other than"):
        LoRACard.from_table([*card.batches[:1], pa.record_batch([pa.array([1])], names=["x"])], card.schema)


# --------------------------------------------------------------------------- zero copy


def _mapping_of(path: Path) -> list[tuple[int, int]]:
    real = str(path.resolve())
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(real):
                lo, hi = line.split()[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_open_33mb_card_is_zero_copy(tmp_path: Path) -> None:
    """LLaMA-7B-shape rank-16 fp16 adapter (q,k,v,o x 32 layers): open copies no tensor byte."""
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(16 * 4096) * 0.01).astype(np.float16)
    mods = [
        ModuleLoRA(
            f"model.layers.{i}.self_attn.{p}_proj", 16, 32.0, block.reshape(16, 4096), block.reshape(4096, 16)
        )
        for i in range(32)
        for p in "qkvo"
    ]
    path = LoRACard.build(mods, name="llama7b-r16").write(tmp_path / "big.lora.arrow")
    del mods
    size = path.stat().st_size
    assert size > 33_000_000
    before_alloc = pa.total_allocated_bytes()
    before_rss = _rss_file_kb()
    card = LoRACard.open(path)
    opened_rss = _rss_file_kb() - before_rss
    assert pa.total_allocated_bytes() - before_alloc == 0
    # opening touched only metadata pages, not the 33 MB of tensors
    assert opened_rss * 1024 < size // 4, f"opening made {opened_rss} kB of the file resident"
    spans = _mapping_of(path)
    assert spans, "the card file is not memory-mapped"
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    for m in card:
        for arr in (m.a, m.b):
            start = arr.ctypes.data
            assert lo <= start and start + arr.nbytes <= hi, f"{m.module}: array outside the mapping"
            assert not arr.flags.owndata
    assert card.tensor_nbytes == 128 * 2 * 16 * 4096 * 2
    card.verify()
    assert pa.total_allocated_bytes() - before_alloc == 0


# --------------------------------------------------------------------------- tampering and trust


def test_one_tensor_byte_changed_fails_verify(tmp_path: Path) -> None:
    card = LoRACard.build(_mods(n=2), name="tamper")
    data = card.to_bytes()
    for m in card:
        for arr in (m.a, m.b):
            raw = arr.tobytes()
            pos = data.find(raw)
            assert pos > 0
            for off in (0, len(raw) // 2, len(raw) - 1):
                bad = bytearray(data)
                bad[pos + off] ^= 0x01  # lowest mantissa bit: stays finite
                p = tmp_path / "t.lora.arrow"
                p.write_bytes(bad)
                with pytest.raises(CardError, match="digest mismatch"):
                    LoRACard.open(p).verify()


@pytest.mark.parametrize(
    "change",
    [
        {"description": "other"},
        {"name": "other"},
        {"version": 2},
        {"tags": ("x",)},
        {"base_model": "m"},
        {"base_fingerprint": "b" * 64},
        {"scaling": "rslora"},
        {"author": "mallory"},
        {"created": "2020-01-01T00:00:00Z"},
        {"lineage": ("c" * 64,)},
        {"peft": {"r": 4}},
        {"format": "1.1"},
        {"extra": {"new_key": 1}},
    ],
)
def test_one_header_field_changed_fails_verify(tmp_path: Path, change: dict) -> None:
    card = LoRACard.build(_mods(), name="hdr")
    path = tmp_path / "h.lora.arrow"
    _write_header(card, path, **change)
    got = LoRACard.open(path)
    assert got.digest == card.digest
    with pytest.raises(CardError, match="digest mismatch"):
        got.verify()


def test_signatures(tmp_path: Path) -> None:
    k1, k2 = keys.generate(), keys.generate()
    pub1, pub2 = keys.public_key_b64(k1.public_key()), keys.public_key_b64(k2.public_key())
    card = LoRACard.build(_mods(), name="signed")
    unsigned = card.verify()
    assert unsigned.status == "unsigned" and not unsigned.signed
    with pytest.raises(TrustError, match="unsigned"):
        card.verify(require_signed=True)
    with pytest.raises(TrustError, match="unsigned"):
        card.verify(trusted=[pub1])

    signed = LoRACard.open(card.sign(k1).write(tmp_path / "s.lora.arrow"))
    assert signed.digest == card.digest  # signing does not change the digest
    v = signed.verify(trusted=[pub1])
    assert v.signed and v.trusted and v.signer == keys.signer_id(pub1)
    assert signed.verify(trusted=[keys.signer_id(pub1)]).trusted
    assert signed.verify(require_signed=True).trusted is None
    with pytest.raises(TrustError, match="not a trusted key"):
        signed.verify(trusted=[pub2])
    # a signature moved under another key, or a signer id that lies, is caught
    forged = tmp_path / "f.lora.arrow"
    _write_header(signed, forged, signer_key=pub2, signer=keys.signer_id(pub2))
    with pytest.raises(TrustError, match="bad signature"):
        LoRACard.open(forged).verify()
    _write_header(signed, forged, signer=keys.signer_id(pub2))
    with pytest.raises(TrustError, match="does not match"):
        LoRACard.open(forged).verify()
    # re-signing a tampered digest by the same key is still a digest mismatch
    _write_header(signed, forged, description="changed")
    with pytest.raises(CardError, match="digest mismatch"):
        LoRACard.open(forged).verify(trusted=[pub1])


def test_key_files(tmp_path: Path) -> None:
    priv, pub = keys.write_keypair(tmp_path / "k")
    assert os.stat(priv).st_mode & 0o777 == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    k = keys.load_private(priv)
    b64 = keys.public_b64_from_file(pub)
    assert b64 == keys.public_key_b64(k.public_key()) == keys.public_b64_from_file(priv)
    assert len(keys.signer_id(b64)) == 32
    with pytest.raises(LoraflightError, match="refusing to overwrite"):
        keys.write_keypair(tmp_path / "k")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(LoraflightError):
        keys.load_private(tmp_path / "junk.pem")


# --------------------------------------------------------------------------- versioning


def test_unknown_major_refused_newer_minor_keys_kept(tmp_path: Path) -> None:
    card = LoRACard.build(_mods(), name="v", extra={"future": {"a": [1, 2]}})
    h = card.header
    assert h.extra == {"future": {"a": [1, 2]}}
    path = card.write(tmp_path / "v.lora.arrow")
    got = LoRACard.open(path)
    assert got.header.extra == {"future": {"a": [1, 2]}}
    got.verify()
    # the unknown key is covered by the digest
    _write_header(card, tmp_path / "w.lora.arrow", extra={"future": {"a": [1, 3]}})
    with pytest.raises(CardError, match="digest mismatch"):
        LoRACard.open(tmp_path / "w.lora.arrow").verify()
    minor = dict(h.to_dict(), format="1.7")
    assert CardHeader.from_dict(minor).format == "1.7"
    with pytest.raises(CardError, match="major version 3"):
        CardHeader.from_dict(dict(h.to_dict(), format="3.0"))


# --------------------------------------------------------------------------- bad input


def test_names() -> None:
    for ok in ("a", "my-adapter_v2.1", "A" * 128):
        assert check_name(ok) == ok
    for bad, why in [
        ("", "non-empty"),
        ("../x", "escape"),
        ("a/b", "escape"),
        ("a\\b", "escape"),
        (".hidden", "escape"),
        ("a..b", "escape"),
        ("a\nb", "non-printable"),
        ("a\x00", "non-printable"),
        ("é", "non-ASCII"),
        ("a" * 129, "limit"),
        ("a ", "escape"),
        ("abc\n", "non-printable"),
    ]:
        with pytest.raises(CardError, match=why):
            check_name(bad)


def test_build_refuses_bad_modules() -> None:
    mods = _mods()
    with pytest.raises(CardError, match="at least one module"):
        LoRACard.build([], name="x")
    with pytest.raises(CardError, match="do not fit rank"):
        LoRACard.build([dataclasses.replace(mods[0], rank=3)], name="x")
    with pytest.raises(CardError, match="raw 16-bit words"):
        LoRACard.build(_mods("float16"), name="x", dtype="bfloat16")
    with pytest.raises(CardError, match="does not match the card dtype"):
        LoRACard.build(_mods("float16"), name="x", dtype="float32")
    with pytest.raises(CardError, match="appears twice"):
        LoRACard.build([mods[0], mods[0]], name="x")
    with pytest.raises(CardError, match="not a module path"):
        LoRACard.build([dataclasses.replace(mods[0], module="../etc")], name="x")
    with pytest.raises(CardError, match="escape"):
        LoRACard.build(mods, name="../x")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_values_found_anywhere(dtype: str) -> None:
    """NaN/Inf detection across the chunked scan, including the last element past a chunk boundary."""
    n = (1 << 18) + 7
    a = np.zeros((1, n), dtype=np.float32)
    b = np.zeros((1, 1), dtype=np.float32)
    for pos, val in ((0, np.nan), (1 << 18, np.inf), (n - 1, -np.inf)):
        bad = a.copy()
        bad[0, pos] = val
        arr = (bad.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else bad.astype(dtype)
        bb = np.zeros((1, 1), np.uint16) if dtype == "bfloat16" else b.astype(dtype)
        card = LoRACard.build([ModuleLoRA("m.x", 1, 1.0, arr, bb)], name="nan", dtype=dtype)
        with pytest.raises(CardError, match="NaN or Inf"):
            card.verify()
    big = np.full((1, n), 65504.0 if dtype == "float16" else 3.0e38, np.float32)
    ok = (big.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else big.astype(dtype)
    bb = np.zeros((1, 1), np.uint16) if dtype == "bfloat16" else b.astype(dtype)
    LoRACard.build([ModuleLoRA("m.x", 1, 1.0, ok, bb)], name="big", dtype=dtype).verify()


@pytest.mark.parametrize(
    ("meta", "why"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b'{"format":"1.0","name":"a","name":"b"}', "duplicate key"),
        (b'{"format":"1.0","x":Infinity}', "not allowed"),
        (b'{"format":"1.0","name":"a","version":1,"dtype":"float32","x":"\\ud800"}', "canonical JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"format":"1.0","x":' + b"9" * 5000 + b"}", "header"),
        (b'{"format":"1.0"}', "'name' is missing"),
        (b"x" * (cardmod.MAX_HEADER_BYTES + 1), "too large"),
    ],
)
def test_bad_header_json(meta: bytes, why: str) -> None:
    with pytest.raises(CardError, match=why):
        CardHeader.from_json(meta)


def test_truncated_or_not_arrow(tmp_path: Path) -> None:
    data = LoRACard.build(_mods(), name="tr").to_bytes()
    p = tmp_path / "t.lora.arrow"
    for cut in range(0, len(data), max(1, len(data) // 97)):
        p.write_bytes(data[:cut])
        with pytest.raises(CardError):
            LoRACard.open(p).verify()
    with pytest.raises(CardError, match="no such card file"):
        LoRACard.open(tmp_path / "missing.lora.arrow")
    with pytest.raises(CardError):
        LoRACard.open(tmp_path)


def test_write_is_atomic_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    card = LoRACard.build(_mods(), name="at")
    target = tmp_path / "dir.lora.arrow"
    target.mkdir()  # os.replace onto a directory fails after the temp file is complete
    with pytest.raises(OSError):
        card.write(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.lora.arrow"]
    assert list(target.iterdir()) == []
    # rewriting a card in place while it is mapped is safe: the old mapping keeps its inode
    path = card.write(tmp_path / "c.lora.arrow")
    opened = LoRACard.open(path)
    first = opened.modules[0].a.copy()
    LoRACard.build(_mods(seed=9), name="at", version=2).write(path)
    assert np.array_equal(opened.modules[0].a, first)
    opened.verify()
    assert LoRACard.open(path).version == 2


def test_header_json_is_canonical() -> None:
    card = LoRACard.build(_mods(), name="canon", description='héllo "q"\n', peft={"b": 1, "a": [0.5]})
    raw = card.header.to_json()
    assert (
        raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert CardHeader.from_json(raw) == card.header


def test_docs_worked_example(tmp_path: Path) -> None:
    """docs/format.md section 9 (format 1), recomputed without the engine's digest code, and with it."""
    import base64
    import hashlib
    import struct

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    fp_stream = b"loraflight-base-v1\x00" + b"layer.q\x002\x002\n"
    fp = hashlib.sha256(fp_stream).hexdigest()
    assert fp == "18ce4d80be7a53d31754a447cc6b12d971ab49b884c8d9e8692e3b7a50a6af9b"
    assert cardmod.base_fingerprint([("layer.q", 2, 2)]) == fp

    def canon(o: object) -> bytes:
        return json.dumps(
            o, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()

    head = canon(
        {
            "author": "",
            "base_fingerprint": fp,
            "base_model": None,
            "created": "2026-01-01T00:00:00Z",
            "description": "",
            "dtype": "float32",
            "format": "1.0",
            "lineage": [],
            "name": "demo",
            "scaling": "standard",
            "tags": [],
            "version": 1,
        }
    )
    assert len(head) == 270
    h = hashlib.sha256(b"loraflight-card-v1\x00" + struct.pack("<Q", len(head)) + head + struct.pack("<Q", 1))
    h.update(struct.pack("<I", 7) + b"layer.q" + struct.pack("<IdQQ", 1, 2.0, 2, 2) + b"\x07float32")
    h.update(
        struct.pack("<Q", 8)
        + struct.pack("<2f", 0.5, -1.0)
        + struct.pack("<Q", 8)
        + struct.pack("<2f", 2.0, 0.25)
    )
    digest = "a9817c8de3c4ee295f9f96746eb7b15169b1c946d326845abef29140aed9525f"
    assert h.hexdigest() == digest

    a = np.array([[0.5, -1.0]], dtype=np.float32)
    b = np.array([[2.0], [0.25]], dtype=np.float32)
    card = LoRACard.build(
        [ModuleLoRA("layer.q", 1, 2.0, a, b)],
        name="demo",
        created="2026-01-01T00:00:00Z",
        base_fingerprint=fp,
        major=1,
    )
    assert card.header.signed_part() == json.loads(head)
    assert card.digest == digest
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    signed = LoRACard.open(card.sign(key).write(tmp_path / "demo.lora.arrow"))
    pub = keys.public_key_b64(key.public_key())
    assert pub == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert (
        signed.header.signer
        == hashlib.sha256(base64.b64decode(pub)).hexdigest()[:32]
        == "56475aa75463474c0285df5dbf2bcab7"
    )
    sig = key.sign(b"loraflight-sig-v1\x00" + bytes.fromhex(digest))
    assert (
        signed.header.signature
        == base64.b64encode(sig).decode()
        == ("uo9v6JZGHo9NRZkcBHMsQI0e7FXtxqVd6egvZijtC67PVyACGuNTGP4H0tSgSy86G1IYVMJOk1uNLnv6mL3LDw==")
    )
    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    assert digest in doc and signed.header.signature in doc and head.decode() in doc
    assert signed.header.to_json().decode() in doc
    signed.verify(trusted=[pub])


def test_big_card_verify_scans_values_and_hashes(tmp_path: Path) -> None:
    """Above the parallel-verify size the value scan runs beside the hash: both still decide."""
    a = np.zeros((4, 1 << 20), np.float32)
    b = np.ones((1, 4), np.float32)
    card = LoRACard.build([ModuleLoRA("m.big", 4, 1.0, a, b)], name="big")
    assert card.tensor_nbytes >= digestmod.PARALLEL_VERIFY_BYTES
    assert card.verify().digest == card.digest
    bad = a.copy()
    bad[3, -1] = np.nan
    with pytest.raises(CardError, match="NaN or Inf"):
        LoRACard.build([ModuleLoRA("m.big", 4, 1.0, bad, b)], name="big").verify()
    bad[3, -1] = 1.0
    path = tmp_path / "t.lora.arrow"
    _write_header(LoRACard.build([ModuleLoRA("m.big", 4, 1.0, bad, b)], name="big"), path, digest=card.digest)
    with pytest.raises(CardError, match="digest mismatch"):
        LoRACard.open(path).verify()


def test_batches_from_a_peer_are_validated_before_use() -> None:
    """LoRACard(header, batches) and CardDigest.update_batch get batches straight off the wire:
    lying offsets give a CardError, never a read out of bounds."""
    card = LoRACard.build(_mods(n=2), name="peer")
    good = card.batches[0]
    names = good.column(0)
    data = names.buffers()[2]
    bad_offsets = pa.py_buffer(np.array([0, 40, 5], dtype=np.int32).tobytes())  # not monotonic
    bad_names = pa.Array.from_buffers(pa.utf8(), 2, [None, bad_offsets, data])
    bad = pa.record_batch([bad_names, *good.columns[1:]], schema=good.schema)
    with pytest.raises(CardError, match="corrupt"):
        LoRACard(card.header, [bad])
    with pytest.raises(CardError, match="corrupt"):
        CardDigest(card.header, 2).update_batch(bad)
    a = good.column(5)
    lying = pa.ListArray.from_buffers(
        a.type,
        2,
        [None, pa.py_buffer(np.array([0, 100, 64], dtype=np.int32).tobytes())],
        children=[a.values],
    )
    with pytest.raises(CardError, match="corrupt"):
        LoRACard(
            card.header, [pa.record_batch([*good.columns[:5], lying, good.column(6)], schema=good.schema)]
        )
    other = pa.record_batch([pa.array(["x"])], names=["module"])
    with pytest.raises(CardError, match="schema"):
        LoRACard(card.header, [other])
    with pytest.raises(CardError, match="schema"):
        CardDigest(card.header, 2).update_batch(other)


def test_compression_bomb_refused_before_inflating(tmp_path: Path) -> None:
    """A zstd-compressed card of zeros is tiny on disk; opening must refuse it without inflating it."""
    zeros = np.zeros((16, 1 << 18), np.float32)  # 16 MiB of zeros
    card = LoRACard.build([ModuleLoRA("m.z", 16, 1.0, zeros, np.zeros((1, 16), np.float32))], name="bomb")
    path = tmp_path / "bomb.lora.arrow"
    with (
        pa.OSFile(str(path), "wb") as f,
        pa.ipc.new_file(f, card.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w,
    ):
        for b in card.batches:
            w.write_batch(b)
    del card, zeros
    assert path.stat().st_size < 100_000
    before = pa.total_allocated_bytes()
    with pytest.raises(CardError, match="compressed"):
        LoRACard.open(path)
    assert pa.total_allocated_bytes() - before == 0


def test_either_copy_of_the_header_is_checked(tmp_path: Path) -> None:
    """The file holds the schema and header twice (start and footer); a change to either is caught."""
    data = LoRACard.build(_mods(), name="twice", description="abc").to_bytes()
    needle = b'"description":"abc"'
    first, last = data.find(needle), data.rfind(needle)
    assert 0 < first < last
    for pos in (first, last):
        bad = bytearray(data)
        bad[pos + len(needle) - 2] ^= 0x01  # "abc" -> "abb"
        p = tmp_path / "t.lora.arrow"
        p.write_bytes(bytes(bad))
        with pytest.raises(CardError, match=r"differ from the footer|digest mismatch"):
            LoRACard.open(p).verify()
