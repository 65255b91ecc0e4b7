"""Incremental detokenization and stop strings (pure; real tokenizers, no model)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraflight.engine.authoring.models import ByteTokenizer
from loraflight.engine.generate.models import minilm_tokenizer
from loraflight.engine.generate.text import IncrementalDetokenizer, StopText, find_stop, holdback


class Bytes(ByteTokenizer):
    """The byte-level tokenizer with Hugging Face's decode signature (it skips specials anyway)."""

    def decode(self, ids, skip_special_tokens=False):
        return super().decode(ids)


@pytest.fixture(scope="module")
def wordpiece():
    return minilm_tokenizer()


def stream(tok, ids, context=()):
    d = IncrementalDetokenizer(tok, context)
    deltas = [d.push(i) for i in ids]
    deltas.append(d.flush())
    return deltas


def test_word_pieces_join_their_word(wordpiece):
    ids = wordpiece("unbelievable tokenization works, really!", add_special_tokens=False)["input_ids"]
    assert "##ization" in wordpiece.convert_ids_to_tokens(ids)
    deltas = stream(wordpiece, ids)
    assert "".join(deltas) == wordpiece.decode(ids) == "unbelievable tokenization works, really!"
    assert "ization" in deltas  # the piece came as its own delta, glued to "token" without a space


def test_prompt_context_gives_the_first_word_its_space(wordpiece):
    prompt = wordpiece("the cat", add_special_tokens=False)["input_ids"]
    ids = wordpiece("sat down", add_special_tokens=False)["input_ids"]
    assert "".join(stream(wordpiece, ids, prompt)) == " sat down"
    assert "".join(stream(wordpiece, ids)) == "sat down"


def test_multibyte_characters_wait_for_their_last_byte():
    tok = Bytes()
    text = "naïve 日本語 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    deltas = stream(tok, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "日" in deltas and deltas[deltas.index("日") - 1] == ""  # its first two bytes gave nothing


def test_a_truncated_character_is_flushed_at_the_end():
    tok = Bytes()
    ids = tok("é", add_special_tokens=False)["input_ids"][:1]
    assert stream(tok, ids) == ["", "\ufffd"]


def test_find_stop_and_holdback():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello world", ["xyz"]) == -1
    assert find_stop("abcabc", ["abc"], start=4) == 3  # only matches ending after `start`
    assert holdback("the end is ne", ["near", "x"]) == 2
    assert holdback("the end is n", ["near"]) == 1
    assert holdback("the end", ["near"]) == 0
    assert holdback("aaa", ["aab"]) == 2


def test_stop_text_never_sends_what_a_stop_swallows():
    s = StopText(["STOP"])
    sent = [s.add(d) for d in ["hello S", "TO", "P and more"]]
    assert sent == ["hello ", "", ""]
    assert s.stopped and s.text == "hello "
    s2 = StopText(["STOP"])
    sent2 = [s2.add(d) for d in ["hello S", "TOW"]] + [s2.finish()]
    assert "".join(sent2) == "hello STOW" and not s2.stopped


@given(
    text=st.text(alphabet="abc ", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=12),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4),
)
def test_stop_text_matches_cutting_the_whole_text(text, cuts, stops):
    points = sorted({c for c in cuts if c < len(text)} | {0, len(text)})
    deltas = [text[a:b] for a, b in itertools.pairwise(points)]
    s = StopText(stops)
    sent = "".join(s.add(d) for d in deltas) + s.finish()
    # generation ends after the first delta whose text so far holds a stop string, cut before
    # the earliest one in it (a longer stop string that would have ended later never comes)
    want, stopped = text, False
    for k in range(1, len(deltas) + 1):
        so_far = "".join(deltas[:k])
        at = find_stop(so_far, stops)
        if at != -1:
            want, stopped = so_far[:at], True
            break
    assert sent == s.text == want
    assert s.stopped == stopped
