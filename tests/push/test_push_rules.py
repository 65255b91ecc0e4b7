"""The pure rules of api.push: targets, the listing, the plan of calls, backoff."""

from __future__ import annotations

import pytest

from loraflight.errors import ConfigError
from loraflight.federation.serving.pushrules import (
    Call,
    PushTarget,
    backoff,
    listed_adapters,
    parse_push,
    plan,
    push_problems,
)


def test_parse_push_targets_and_their_endpoints() -> None:
    v = parse_push("vllm+http://127.0.0.1:8000")
    assert v == PushTarget("vllm", "http://127.0.0.1:8000")
    assert v.url("load") == "http://127.0.0.1:8000/v1/load_lora_adapter"
    assert v.url("unload") == "http://127.0.0.1:8000/v1/unload_lora_adapter"
    s = parse_push("sglang+https://[::1]:30000/")
    assert s.url("load") == "https://[::1]:30000/load_lora_adapter"
    assert s.url("unload") == "https://[::1]:30000/unload_lora_adapter"
    assert s.url("models") == "https://[::1]:30000/v1/models"
    for bad in ("vllm://h:1", "ollama+http://h:1", "vllm+ftp://h:1", "vllm+http://h", "vllm+http://h:1/x"):
        with pytest.raises(ConfigError, match=r"api\.push"):
            parse_push(bad)


def test_push_problems_lists_every_problem() -> None:
    p = push_problems(["vllm+http://a:1", "vllm+http://a:1", "nope"], 0)
    assert len(p) == 3 and any("twice" in x for x in p) and any("push_interval" in x for x in p)
    assert push_problems([], 30.0) == []


def test_listed_adapters_are_the_entries_with_a_parent() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "base", "root": "/models/base", "parent": None},
            {"id": "a", "root": "/x/a-v1", "parent": "base"},
            {"id": "b", "parent": "base"},
        ],
    }
    assert listed_adapters(listing) == {"a": "/x/a-v1", "b": None}
    with pytest.raises(ValueError):
        listed_adapters({"models": []})


def test_plan_unloads_what_goes_loads_what_comes_and_replaces_what_changed() -> None:
    desired = {"a": "/e/a-v2", "b": "/e/b-v1", "c": "/e/c-v1"}
    actual = {"a": "/e/a-v1", "b": "/e/b-v1", "z": "/foreign/z"}
    assert plan(desired, actual, {}) == [
        Call("unload", "z"),
        Call("unload", "a"),
        Call("load", "a", "/e/a-v2"),
        Call("load", "c", "/e/c-v1"),
    ]
    assert plan(desired, {**desired}, {}) == []  # in line: nothing to do
    # the listing gives no path: what this node pushed stands in; unknown -> replaced once
    assert plan({"a": "/e/a-v2"}, {"a": None}, {"a": "/e/a-v2"}) == []
    assert plan({"a": "/e/a-v2"}, {"a": None}, {}) == [Call("unload", "a"), Call("load", "a", "/e/a-v2")]
    # pushed earlier, not listed (a server that lists no adapters), no longer wanted: unloaded
    assert plan({}, {}, {"a": "/e/a-v1"}) == [Call("unload", "a")]
    assert Call("load", "a", "/p").body() == {"lora_name": "a", "lora_path": "/p"}
    assert Call("unload", "a").body() == {"lora_name": "a"}


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(i, 0.2, 1.0) for i in (1, 2, 3, 4, 10)] == [0.2, 0.4, 0.8, 1.0, 1.0]
