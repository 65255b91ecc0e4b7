"""Causal-LM loading: the LM head, the tokenizer and the chat template come along; prompts."""

from __future__ import annotations

import json

import pytest
import torch

from loraflight.engine.generate.models import (
    TINY_CHAT_LLAMA_ID,
    encode_prompt,
    is_causal_lm_folder,
    load_causal_lm,
    render_chat,
    tiny_chat_llama,
)
from loraflight.errors import ConfigError, EngineError


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_llama(3)


def test_tiny_chat_llama_speaks_minilms_vocabulary(lm):
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.model.config.vocab_size == lm.tokenizer.vocab_size == 30522
    assert lm.model_id == TINY_CHAT_LLAMA_ID and lm.has_chat_template
    assert lm.eos_token_ids == (lm.tokenizer.sep_token_id,)
    again = tiny_chat_llama(3)
    assert all(
        torch.equal(a, b) for a, b in zip(lm.model.parameters(), again.model.parameters(), strict=True)
    )


def test_prompts_completion_and_chat(lm):
    tok = lm.tokenizer
    ids = encode_prompt(tok, "Hello world")
    assert ids[0] == tok.cls_token_id and tok.sep_token_id not in ids
    assert tok.decode(ids[1:]) == "hello world"
    chat = render_chat(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert tok.decode(chat) == "system : be brief user : hi assistant :"
    with pytest.raises(EngineError, match="string"):
        encode_prompt(tok, ["not", "a", "string"])


def test_a_saved_causal_lm_folder_loads_with_its_head_and_template(lm, tmp_path):
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    assert is_causal_lm_folder(tmp_path / "m")
    got = load_causal_lm(str(tmp_path / "m"))
    assert type(got.model).__name__ == "LlamaForCausalLM"
    assert got.has_chat_template and got.max_context == lm.max_context
    assert lm.tokenizer.sep_token_id in got.eos_token_ids
    x = torch.tensor([encode_prompt(lm.tokenizer, "same logits")])
    with torch.no_grad():
        assert torch.allclose(got.model(input_ids=x).logits, lm.model(input_ids=x).logits, atol=1e-6)


def test_a_folder_without_template_loads_without_chat(lm, tmp_path):
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.chat_template = None
    try:
        lm.tokenizer.save_pretrained(tmp_path / "m")
    finally:
        lm.tokenizer.chat_template = tiny_chat_llama(3).tokenizer.chat_template
    got = load_causal_lm(str(tmp_path / "m"))
    assert not got.has_chat_template
    with pytest.raises(EngineError, match="no chat template"):
        render_chat(got.tokenizer, [{"role": "user", "content": "hi"}])


def test_non_causal_and_missing_folders_are_refused(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert not is_causal_lm_folder(tmp_path / "enc")
    with pytest.raises(ConfigError, match="ForCausalLM"):
        load_causal_lm(str(tmp_path / "enc"))
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        load_causal_lm(str(tmp_path / "nowhere"))


def test_is_causal_spec(lm, tmp_path):
    from loraflight.engine.generate.models import is_causal_spec

    assert is_causal_spec("tiny-chat-llama")
    lm.model.save_pretrained(tmp_path / "m")
    assert is_causal_spec(str(tmp_path / "m"))
    assert not is_causal_spec("minilm") and not is_causal_spec(str(tmp_path / "none"))
