"""Generation request parsing (pure): OpenAI's fields, what is refused and how it is named."""

from __future__ import annotations

import json

import pytest

from loraflight.errors import ConfigError
from loraflight.federation.config import KEYS_BY_PATH, load_config
from loraflight.federation.serving.errors import Failure
from loraflight.federation.serving.gen_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_generation_request,
)


def parse(body, chat=False):
    return parse_generation_request(json.dumps(body).encode(), chat=chat)


def test_completion_fields():
    r = parse(
        {
            "model": "m",
            "prompt": ["hi"],
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 0.5,
            "stop": "x",
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u",
            "n": 1,
        }
    )
    assert isinstance(r, CompletionRequest)
    assert (r.text, r.max_tokens, r.temperature, r.top_p, r.stops, r.seed, r.stream, r.include_usage) == (
        "hi",
        5,
        0.0,
        0.5,
        ("x",),
        3,
        True,
        True,
    )


def test_chat_fields_and_routing_text():
    r = parse(
        {
            "model": "auto",
            "max_completion_tokens": 7,
            "messages": [
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": [{"type": "text", "text": "first"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "last one"},
            ],
        },
        chat=True,
    )
    assert isinstance(r, ChatCompletionRequest)
    assert r.limit == 7 and r.last_user_message == "last one"
    assert r.template_messages()[0] == {"role": "system", "content": "rules"}


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"n": 3}, "n", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"frequency_penalty": 1.0}, "frequency_penalty", "unsupported_parameter"),
        ({"wat": 1}, "wat", "unknown_parameter"),
        ({"temperature": 3}, "temperature", "invalid_request_error"),
        ({"top_p": 0}, "top_p", "invalid_request_error"),
        ({"max_tokens": 0}, "max_tokens", "invalid_request_error"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_request_error"),
    ],
)
def test_refusals_name_the_field(extra, param, code):
    f = parse({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}, chat=True)
    assert isinstance(f, Failure) and f.status == 400
    assert f.param == param and f.code == code
    assert param in f.message


def test_neutral_values_of_unsupported_fields_pass():
    r = parse({"model": "m", "prompt": "x", "n": 1, "logprobs": None, "echo": False, "presence_penalty": 0})
    assert isinstance(r, CompletionRequest)


def test_bad_prompts_and_messages():
    for body, param in (
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m"}, "prompt"),
    ):
        f = parse(body)
        assert isinstance(f, Failure) and f.param == param, body
    f = parse({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, chat=True)
    assert isinstance(f, Failure) and f.param == "messages"
    f = parse({"model": "m", "messages": []}, chat=True)
    assert isinstance(f, Failure) and f.param == "messages"
    f = parse_generation_request(b"{not json", chat=False)
    assert isinstance(f, Failure) and f.code == "invalid_json"


def test_api_max_tokens_key():
    k = KEYS_BY_PATH["api.max_tokens"]
    assert (k.flag, k.env, k.default) == ("--api-max-tokens", "LORAFLIGHT_API_MAX_TOKENS", 256)
    assert load_config(env={"LORAFLIGHT_API_MAX_TOKENS": "12"}).api.max_tokens == 12
    assert load_config(env={}, flags={"api.max_tokens": 99}).api.max_tokens == 99
    with pytest.raises(ConfigError, match=r"api\.max_tokens"):
        load_config(env={}, flags={"api.max_tokens": 0})
