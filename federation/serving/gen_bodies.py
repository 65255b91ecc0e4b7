"""OpenAI's response shapes for completions and chat completions, whole and streamed (pure).

A streamed response is server-sent events: one ``data: {chunk}`` per text delta (chat: the
first chunk carries the ``assistant`` role), a last chunk with the `finish_reason`, an
optional usage chunk (``stream_options.include_usage``: empty ``choices``), then
``data: [DONE]``. An error after the stream began is sent as ``data: {"error": …}`` before
``[DONE]`` (the status line has gone out already). `system_fingerprint` is the digest the
request ran on (``base`` for the base model).
"""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _head(rid: str, obj: str, created: int, model: str, fingerprint: str) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint}


def completion_body(
    rid: str, created: int, model: str, fingerprint: str, text: str, finish_reason: str, use: dict[str, int]
) -> dict[str, Any]:
    return {
        **_head(rid, "text_completion", created, model, fingerprint),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": use,
    }


def completion_chunk(
    rid: str, created: int, model: str, fingerprint: str, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        **_head(rid, "text_completion", created, model, fingerprint),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_body(
    rid: str, created: int, model: str, fingerprint: str, text: str, finish_reason: str, use: dict[str, int]
) -> dict[str, Any]:
    return {
        **_head(rid, "chat.completion", created, model, fingerprint),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    fingerprint: str,
    text: str | None,
    finish_reason: str | None = None,
    *,
    role: bool = False,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {
        **_head(rid, "chat.completion.chunk", created, model, fingerprint),
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(
    rid: str, obj: str, created: int, model: str, fingerprint: str, use: dict[str, int]
) -> dict[str, Any]:
    """The last chunk before ``[DONE]`` when the client asked for usage: no choices."""
    return {**_head(rid, obj, created, model, fingerprint), "choices": [], "usage": use}


__all__ = [
    "SSE_DONE",
    "chat_body",
    "chat_chunk",
    "completion_body",
    "completion_chunk",
    "sse",
    "usage",
    "usage_chunk",
]
