"""`LoRACard.open_buffer`: a card's file bytes checked in memory with the same rules as `open`
(what a bundle receiver uses for a card that arrived in one piece)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest

from loraflight.engine.card import LoRACard
from loraflight.errors import CardError
from loraflight.testing import make_card


def _file_bytes(tmp_path: Path) -> tuple[LoRACard, bytes]:
    card = make_card("buf", 1, nbytes=64 << 10, modules=3)
    p = card.write(tmp_path / "buf.lora.arrow")
    return card, p.read_bytes()


def test_open_buffer_reads_and_verifies_like_open(tmp_path: Path) -> None:
    card, data = _file_bytes(tmp_path)
    got = LoRACard.open_buffer(pa.py_buffer(data), tmp_path / "x.part")
    assert got.header == card.header
    assert got.verify().digest == card.digest
    same = LoRACard.open_buffer(pa.py_buffer(data), tmp_path / "x.part", expect=card.header)
    assert same.header is card.header  # the listing's header, not parsed again
    assert same.verify().digest == card.digest


def test_open_buffer_refuses_a_flipped_tensor_byte_and_a_different_header(tmp_path: Path) -> None:
    card, data = _file_bytes(tmp_path)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01  # inside the tensor bytes
    bad = LoRACard.open_buffer(pa.py_buffer(bytes(flipped)), tmp_path / "x.part", expect=card.header)
    with pytest.raises(CardError, match="digest mismatch"):
        bad.verify()
    other = dataclasses.replace(card.header, description="another header")
    got = LoRACard.open_buffer(pa.py_buffer(data), tmp_path / "x.part", expect=other)
    assert got.header == card.header and got.header != other  # the file's own header is parsed


def test_open_buffer_errors_name_the_path(tmp_path: Path) -> None:
    _card, data = _file_bytes(tmp_path)
    with pytest.raises(CardError, match=r"x\.part: not an Arrow IPC file or truncated"):
        LoRACard.open_buffer(pa.py_buffer(data[: len(data) // 2]), tmp_path / "x.part")
    with pytest.raises(CardError, match="empty"):
        LoRACard.open_buffer(pa.py_buffer(b""), tmp_path / "x.part")
