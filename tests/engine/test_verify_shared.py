"""Format-2 verify with the value scan shared out over the hashing threads (`PieceJob(finite=True)`),
and the integer-reduction finite check it uses, checked against numpy's isfinite on every 16-bit word."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import loraflight.engine.card.batches as batchmod
from loraflight.engine.card import LoRACard, ModuleLoRA, PieceJob
from loraflight.engine.card.pieces import hash_parts, hash_scan
from loraflight.engine.card.values import FINITE_CHUNK_BYTES, FiniteScan, all_finite
from loraflight.errors import CardError

N_MODULES = 12


def many_pieces(monkeypatch: pytest.MonkeyPatch, poison: tuple[int, str] | None = None) -> LoRACard:
    """A format-2 card of 12 pieces and 1.5 MiB (big enough for the threaded path)."""
    monkeypatch.setattr(batchmod, "BATCH_TARGET_BYTES", 128 << 10)
    rng = np.random.default_rng(7)
    mods = []
    for i in range(N_MODULES):
        a = rng.standard_normal((16, 2048)).astype(np.float16)
        b = rng.standard_normal((2048, 16)).astype(np.float16)
        if poison is not None and poison[0] == i:
            (a if poison[1] == "a" else b)[3, 5] = np.nan if poison[1] == "a" else -np.inf
        mods.append(ModuleLoRA(f"layers.{i}.q_proj", 16, 32.0, a, b))
    card = LoRACard.build(mods, name="shared", created="2026-01-01T00:00:00Z")
    assert len(card.header.pieces) == N_MODULES
    return card


def flip(card: LoRACard, index: int) -> bytes:
    data = bytearray(card.to_bytes())
    raw = card.runs[index].flat_b.tobytes()
    pos = data.find(raw)
    assert pos > 0
    data[pos + len(raw) // 2] ^= 0x01  # a mantissa bit: still finite
    return bytes(data)


def test_flipped_byte_in_a_fresh_file_fails_on_every_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = many_pieces(monkeypatch)
    good = tmp_path / "good.lora.arrow"
    card.write(good)
    assert LoRACard.open(good).verify().digest == card.digest
    for i in (0, 5, N_MODULES - 1):
        path = tmp_path / f"bad-{i}.lora.arrow"  # a new file each time
        path.write_bytes(flip(card, i))
        with pytest.raises(CardError, match=f"digest mismatch: piece {i} of {N_MODULES} "):
            LoRACard.open(path).verify()
        opened = LoRACard.open(path)
        job = PieceJob(opened.header, opened.runs, threads=2, finite=True)  # helpers forced
        with pytest.raises(CardError, match=f"piece {i} of {N_MODULES}"):
            job.result()


@pytest.mark.parametrize(("row", "col"), [(0, "a"), (N_MODULES - 1, "b"), (6, "a")])
def test_nonfinite_value_is_named_before_a_bad_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row: int, col: str
) -> None:
    card = many_pieces(monkeypatch, poison=(row, col))
    label = "lora_a" if col == "a" else "lora_b"
    path = tmp_path / "nan.lora.arrow"
    card.write(path)
    with pytest.raises(CardError, match=f"'layers.{row}.q_proj': {label} has NaN or Inf"):
        LoRACard.open(path).verify()
    other = 2 if row != 2 else 3  # a tampered piece elsewhere too: the value error comes first
    path.write_bytes(flip(card, other))
    with pytest.raises(CardError, match=f"'layers.{row}.q_proj': {label} has NaN or Inf"):
        LoRACard.open(path).verify()
    opened = LoRACard.open(path)
    for threads in (1, 2):
        with pytest.raises(CardError, match="has NaN or Inf"):
            PieceJob(opened.header, opened.runs, threads=threads, finite=True).result()
    # without the value scan the job reports the bad piece only
    with pytest.raises(CardError, match=f"piece {other} of {N_MODULES}"):
        PieceJob(opened.header, opened.runs, threads=2).result()


def test_all_finite_agrees_with_the_exponent_rule_on_every_16_bit_word() -> None:
    words = np.arange(1 << 16, dtype=np.uint16)
    assert np.array_equal(~np.isfinite(words.view(np.float16)), (words & 0x7C00) == 0x7C00)
    for dtype, mask in (("float16", 0x7C00), ("bfloat16", 0x7F80)):
        bad = (words & mask) == mask
        got = np.array([all_finite(words[i : i + 1], dtype) for i in range(words.size)])
        assert np.array_equal(got, ~bad), dtype
        assert not all_finite(words, dtype)
        assert all_finite(words[~bad], dtype)


def test_all_finite_float32_edges_and_chunks() -> None:
    edges = np.array(
        [0x7F7FFFFF, 0x7F800000, 0x7FC00000, 0x7FFFFFFF, 0xFF7FFFFF, 0xFF800000, 0xFFFFFFFF, 0x80000000, 1],
        dtype=np.uint32,
    )
    want = [True, False, False, False, True, False, False, True, True]
    assert [all_finite(edges[i : i + 1].view(np.float32), "float32") for i in range(edges.size)] == want
    big = np.zeros(3 * (1 << 18) + 17, np.float32)  # several chunks; the bad value in the last
    assert all_finite(big, "float32")
    big[-1] = np.nan
    assert not all_finite(big, "float32")
    assert all_finite(np.zeros(0, np.float32), "float32")


def storage(vals: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in a card's storage dtype (bfloat16: the top 16 bits of each word)."""
    return (vals.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else vals.astype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_finite_scan_is_exact_where_the_or_reduction_cannot_decide(dtype: str) -> None:
    """Finite values that set every exponent bit between them (3.0 beside 0.75, 1.5, ...) defeat
    the one-pass OR test: those chunks, and every later one, get the exact check."""
    step = FINITE_CHUNK_BYTES // (4 if dtype == "float32" else 2)
    vals = np.tile(
        np.array([3.0, 0.75, 1.5, -0.3, 1e-3, 65000.0 if dtype != "float32" else 3e38], np.float32),
        3 * step // 6 + 1,
    )
    words = storage(vals, dtype)
    exp_all = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000}[dtype]
    wv = words.view(np.uint32 if dtype == "float32" else np.uint16)
    assert int(np.bitwise_or.reduce(wv[:step])) & exp_all == exp_all  # the OR cannot rule NaN out
    assert all_finite(words, dtype)
    for pos in (5, step + 7, words.size - 1):  # first chunk, after the OR was given up, the last
        bad = words.copy()
        bad.view(wv.dtype)[pos] = exp_all | 1  # a NaN
        assert not all_finite(bad, dtype)
        scan = FiniteScan(bad, dtype)
        got = [scan.check(i, i + scan.step) for i in range(0, bad.size, scan.step)]
        assert got.count(False) == 1 and not got[pos // scan.step]
    small = np.full(2 * step + 3, 0.01, np.float32)  # the OR decides: every chunk passes on it
    small = storage(small, dtype)
    assert all_finite(small, dtype)
    small.view(wv.dtype)[-1] = exp_all  # Inf in the short last chunk
    assert not all_finite(small, dtype)


def test_hash_scan_is_hash_parts_plus_the_value_check(monkeypatch: pytest.MonkeyPatch) -> None:
    card = many_pieces(monkeypatch)
    run = card.runs[3]
    prefix = b"framing"
    want = hash_parts(prefix, run.flat_a.data.cast("B"), run.flat_b.data.cast("B"))
    assert hash_scan(prefix, run.flat_a, run.flat_b, "float16") == (want, True)
    b = run.flat_b.copy()
    b[-1] = np.inf
    got, finite = hash_scan(prefix, run.flat_a, b, "float16")
    assert not finite and got == hash_parts(prefix, run.flat_a.data.cast("B"), b.data.cast("B"))


class StalledHelper(PieceJob):
    """A PieceJob whose helper thread stops in the middle of its first piece, as a helper
    switched out by the scheduler for a long time slice does (the OS scheduler itself cannot
    be driven from a test): the caller must hash that piece again rather than wait for it."""

    def __init__(self, *args: object, **kw: object) -> None:
        self.entered = threading.Event()  # the helper is inside its first piece
        self.release = threading.Event()
        self.caller = threading.get_ident()
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def _owner_goes_on(self, i: int, done: int) -> bool:
        if threading.get_ident() != self.caller:
            if not self.entered.is_set():
                self.entered.set()
                assert self.release.wait(30), "the test never released the helper"
        elif not self.entered.is_set():
            assert self.entered.wait(30), "the helper never started"
        return super()._owner_goes_on(i, done)


@pytest.mark.parametrize("tampered", [False, True])
def test_a_piece_whose_helper_stalls_is_hashed_again_by_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tampered: bool
) -> None:
    card = many_pieces(monkeypatch)
    path = tmp_path / "card.lora.arrow"
    data = card.to_bytes()
    if tampered:  # every piece, so whichever one the helper stops in is a bad one
        for i in range(N_MODULES):
            data = flip(LoRACard.from_table(pa.ipc.open_file(pa.BufferReader(data)).read_all()), i)
    path.write_bytes(data)
    opened = LoRACard.open(path)
    job = StalledHelper(opened.header, opened.runs, threads=2, finite=True)
    try:
        if not tampered:
            assert job.result() == card.digest  # while the helper is still stopped in its piece
        else:
            every = ", ".join(map(str, range(N_MODULES)))
            with pytest.raises(CardError, match=f"piece 0 of {N_MODULES} .*bad pieces: {every}\\)"):
                job.result()
        assert not job.release.is_set()
    finally:
        job.release.set()
