"""Failures of a serving request, as values, and OpenAI's error body for them.

A request that cannot be served becomes a `Failure` (HTTP status, OpenAI error ``type`` and
``code``, a message saying what was wrong and what to do). The HTTP API answers it as
``{"error": {"message", "type", "code", "param"}}``; the Flight exchange raises the
loraflight error of the same kind (`Failure.to_error`). Pure: no web framework here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loraflight.errors import (
    AuthError,
    BusyError,
    CardNotFound,
    ConfigError,
    EngineError,
    LoraflightError,
)


@dataclasses.dataclass(frozen=True)
class Failure:
    status: int
    type: str
    code: str
    message: str
    param: str | None = None
    retry_after: float | None = None  # seconds, for 429

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def to_error(self) -> LoraflightError:
        """The loraflight error of the same kind (for callers outside HTTP, e.g. Flight)."""
        msg = f"{self.message} [{self.code}]"
        if self.status == 404:
            return CardNotFound(msg)
        if self.status == 429:
            return BusyError(msg)
        if self.status == 401:
            return AuthError(msg)
        if self.status >= 500:
            return EngineError(msg)
        return ConfigError(msg)


def bad_request(message: str, code: str = "invalid_request_error", param: str | None = None) -> Failure:
    return Failure(400, "invalid_request_error", code, message, param)


def model_not_found(model: str, known: list[str]) -> Failure:
    shown = ", ".join(known[:20]) + (" …" if len(known) > 20 else "")
    return Failure(
        404,
        "invalid_request_error",
        "model_not_found",
        f"the model {model!r} does not exist on this node; GET /v1/models lists what it serves"
        + (f" ({shown})" if shown else ""),
        "model",
    )


def context_length_exceeded(index: int, tokens: int, limit: int) -> Failure:
    return Failure(
        400,
        "invalid_request_error",
        "context_length_exceeded",
        f"input {index} is {tokens} tokens long; this model's limit is {limit} tokens: shorten or split it",
        "input",
    )


def too_large(size: int | None, limit: int) -> Failure:
    got = f"{size} bytes" if size is not None else "more bytes than that"
    return Failure(
        413,
        "invalid_request_error",
        "request_too_large",
        f"the request body is {got}; this node accepts at most {limit} bytes (api.max_body_bytes): "
        "send fewer or shorter inputs per request",
    )


def busy(queued: int, limit: int, retry_after: float = 1.0) -> Failure:
    return Failure(
        429,
        "rate_limit_error",
        "queue_full",
        f"{queued} inputs are queued and the limit is {limit} (api.queue); retry after a moment",
        retry_after=retry_after,
    )


def unauthorized() -> Failure:
    return Failure(
        401,
        "invalid_request_error",
        "invalid_api_key",
        "a valid bearer token is required (Authorization: Bearer TOKEN, one of the node's tokens.read)",
    )


def failure_of(exc: BaseException) -> Failure:
    """A Failure for an exception raised while serving (unexpected ones are 500s)."""
    if isinstance(exc, CardNotFound):
        return Failure(404, "invalid_request_error", "model_not_found", str(exc), "model")
    if isinstance(exc, BusyError):
        return Failure(429, "rate_limit_error", "queue_full", str(exc), retry_after=1.0)
    if isinstance(exc, AuthError):
        return unauthorized()
    if isinstance(exc, EngineError):
        return Failure(503, "server_error", "engine_unavailable", f"the engine could not run this: {exc}")
    if isinstance(exc, (ConfigError, ValueError)):
        return bad_request(str(exc))
    return Failure(500, "server_error", "internal_error", f"internal error: {type(exc).__name__}")


__all__ = [
    "Failure",
    "bad_request",
    "busy",
    "context_length_exceeded",
    "failure_of",
    "model_not_found",
    "too_large",
    "unauthorized",
]
