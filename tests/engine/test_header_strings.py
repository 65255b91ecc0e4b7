"""Control characters in card headers (issue 13, "Bad data in the tools"): a new header refuses
them in its description; cards already written (or forged by a peer) still read, and the
CLI prints their strings escaped (tests/cli/test_hostile_strings.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loraflight.engine.card import CardMeta, LoRACard, ModuleLoRA
from loraflight.errors import CardError

HOSTILE = [
    "\x1b[2Jcleared",  # CSI: clears the screen
    "\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07",  # OSC 8 hyperlink
    "fine\rEVIL",  # CR overwrite
    "\u202etxt.exe",  # bidi override
    "bell\x07",
    "c1\x9bcsi",  # the 8-bit CSI
    "del\x7f",
]


def _mods() -> list[ModuleLoRA]:
    rng = np.random.default_rng(0)
    return [ModuleLoRA("layer.q", 2, 4.0, rng.standard_normal((2, 3), dtype=np.float32),
                       rng.standard_normal((3, 2), dtype=np.float32))]  # fmt: skip


@pytest.mark.parametrize("text", HOSTILE)
def test_a_new_card_refuses_control_characters_in_its_description(text: str) -> None:
    with pytest.raises(CardError, match="control character"):
        CardMeta("x", description=text)
    with pytest.raises(CardError, match="control character"):
        LoRACard.build(_mods(), name="x", description=text)


@pytest.mark.parametrize("field", ["author", "base_model"])
def test_other_header_strings_refuse_controls(field: str) -> None:
    with pytest.raises(CardError):
        LoRACard.build(_mods(), name="x", **{field: "a\x1b[31m"})
    with pytest.raises(CardError):
        LoRACard.build(_mods(), name="x", tags=["t\u202e"])


def test_newlines_tabs_and_other_unicode_are_fine() -> None:
    text = "line one\n\tline two: caf\u00e9, \u65e5\u672c, \U0001f468\u200d\U0001f469\u200d\U0001f467"
    card = LoRACard.build(_mods(), name="x", description=text)
    assert card.header.description == text
    assert CardMeta("x", description=text).description == text


@pytest.mark.parametrize("text", HOSTILE)
def test_cards_written_with_controls_still_read(tmp_path, text: str) -> None:
    """A card an older loraflight wrote (or a peer forged) opens and verifies as before."""
    card = LoRACard.build(_mods(), name="x", description="clean")
    old = card.with_header(dataclasses.replace(card.header, description=text))
    old = old.with_header(old.content_header())
    path = old.write(tmp_path / "old.lora.arrow")
    back = LoRACard.open(path)
    back.verify()
    assert back.header.description == text
