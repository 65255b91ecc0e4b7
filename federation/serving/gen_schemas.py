"""Request models of the generation endpoints (pydantic), mirroring OpenAI's fields.

``POST /v1/completions`` and ``POST /v1/chat/completions`` take `model`, the prompt or the
messages, `max_tokens` (chat: also `max_completion_tokens`), `temperature`, `top_p`, `stop`,
`seed`, `stream` (with `stream_options.include_usage`) and `user`. OpenAI fields this node
does not implement (`n` > 1, `logprobs`, `tools`, …) are refused with a 400 naming the
field (code ``unsupported_parameter``), unknown fields with ``unknown_parameter``; a
supported-but-neutral value (``n: 1``, ``logprobs: false``, a zero penalty, ``null``)
passes. `parse_generation_request` turns a raw body into a request or a `Failure`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import Failure, bad_request

MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 1024

# OpenAI fields this node knows and does not implement: why, and the values that mean "off".
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "n": ("this node returns one choice per request (n must be 1)", (None, 1)),
    "best_of": ("this node returns one choice per request", (None, 1)),
    "logprobs": ("log-probabilities are not returned", (None, False)),
    "top_logprobs": ("log-probabilities are not returned", (None, 0)),
    "echo": ("the prompt is not echoed", (None, False)),
    "suffix": ("insertion (suffix) is not supported", (None, "")),
    "logit_bias": ("logit_bias is not supported", (None, {})),
    "presence_penalty": ("penalties are not supported", (None, 0, 0.0)),
    "frequency_penalty": ("penalties are not supported", (None, 0, 0.0)),
    "repetition_penalty": ("penalties are not supported", (None, 1, 1.0)),
    "tools": ("tool calls are not supported", (None, [])),
    "tool_choice": ("tool calls are not supported", (None, "none")),
    "parallel_tool_calls": ("tool calls are not supported", (None, False)),
    "functions": ("function calls are not supported", (None, [])),
    "function_call": ("function calls are not supported", (None, "none")),
    "response_format": ("structured output is not supported", (None, {"type": "text"})),
    "audio": ("audio output is not supported", (None,)),
    "modalities": ("only text is generated", (None, ["text"])),
    "prediction": ("predicted outputs are not supported", (None,)),
    "reasoning_effort": ("reasoning options are not supported", (None,)),
    "web_search_options": ("web search is not supported", (None,)),
    "min_tokens": ("min_tokens is not supported", (None, 0)),
    "top_k": ("top_k is not supported (use top_p)", (None, 0, -1)),
}
# accepted and without effect here
_IGNORED = ("user", "store", "metadata", "service_tier")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions (one prompt: a string, or a list holding one string)."""

    prompt: str | list[str] = Field()

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as chat templates take them (``developer`` is the ``system`` role)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages
        ]

    @property
    def last_user_message(self) -> str:
        """What ``model="auto"`` routes on: the last user message (else the last message)."""
        users = [m for m in self.messages if m.role == "user"]
        return (users[-1] if users else self.messages[-1]).text


GenerationRequest = CompletionRequest | ChatCompletionRequest


def parse_generation_request(body: bytes, *, chat: bool) -> GenerationRequest | Failure:
    """The request in `body` (JSON), or the 400 saying what is wrong with it."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return bad_request(f"the body is not valid JSON: {e}", code="invalid_json")
    if not isinstance(raw, dict):
        return bad_request("the body must be a JSON object")
    for name, (why, off) in UNSUPPORTED.items():
        if name in raw:
            if (
                any(raw[name] == v and type(raw[name]) is type(v) for v in off if v is not None)
                or raw[name] is None
            ):
                del raw[name]
            else:
                return bad_request(
                    f"unsupported field {name!r}: {why}", code="unsupported_parameter", param=name
                )
    for name in _IGNORED:
        raw.pop(name, None)
    model = ChatCompletionRequest if chat else CompletionRequest
    try:
        req = model.model_validate(raw)
    except ValidationError as e:
        return _failure(e, model)
    if isinstance(req, CompletionRequest):
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            return bad_request(
                f"'prompt' is a list of {len(req.prompt)} strings; this node takes one prompt per request",
                param="prompt",
            )
        if len(req.text) > MAX_PROMPT_CHARS:
            return bad_request(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
    elif sum(len(m.text) for m in req.messages) > MAX_PROMPT_CHARS:
        return bad_request(f"'messages' hold more than {MAX_PROMPT_CHARS} characters", param="messages")
    stops = req.stops
    if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
        return bad_request("'stop' takes up to 4 non-empty strings of at most 256 characters", param="stop")
    return req


def _failure(e: ValidationError, model: type[BaseModel]) -> Failure:
    errs = e.errors(include_url=False)
    extra = [x for x in errs if x["type"] == "extra_forbidden" and x["loc"]]
    if extra:
        where = ".".join(str(p) for p in extra[0]["loc"])
        fields = ", ".join(f for f in model.model_fields)
        return bad_request(
            f"unknown field {where!r}; fields: {fields}",
            code="unknown_parameter",
            param=str(extra[0]["loc"][0]),
        )
    first = errs[0]
    loc = [str(p) for p in first.get("loc", ())]
    field = loc[0] if loc else None
    if field == "prompt":
        return bad_request("'prompt' must be a string (token-id prompts are not supported)", param="prompt")
    if field == "messages" and first["type"] not in ("missing", "too_short"):
        return bad_request(
            f"'{'.'.join(loc)}': {first.get('msg', 'invalid')} (messages are {{role, content}} with text content; "
            "roles: system, developer, user, assistant)",
            param="messages",
        )
    if first["type"] == "missing":
        return bad_request(f"'{field}' is required", param=field)
    return bad_request(f"'{'.'.join(loc)}': {first.get('msg', 'invalid')}", param=field)


__all__ = [
    "UNSUPPORTED",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationRequest",
    "StreamOptions",
    "parse_generation_request",
]
