"""Request models of the HTTP API (pydantic), mirroring OpenAI's fields.

Fields this node does not support are refused with a 400 that names them (``extra="forbid"``),
never silently ignored. `parse_embedding_request` turns a raw body into a request or a
`Failure`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import Failure, bad_request

# OpenAI fields of /v1/embeddings this node knows and refuses (the rest are unknown).
UNSUPPORTED = {"dimensions": "this node returns the model's full dimension; drop 'dimensions'"}


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=512)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(default=None, max_length=512)  # accepted, recorded nowhere

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_embedding_request(body: bytes, *, max_inputs: int) -> EmbeddingRequest | Failure:
    """The request in `body` (JSON), or the 400 saying what is wrong with it."""
    try:
        req = EmbeddingRequest.model_validate_json(body)
    except ValidationError as e:
        return _failure(e)
    n = len(req.texts)
    if n == 0:
        return bad_request("'input' is an empty list; give at least one string", param="input")
    if n > max_inputs:
        return bad_request(
            f"'input' has {n} items; this node accepts at most {max_inputs} per request (api.max_inputs)",
            param="input",
        )
    return req


def _failure(e: ValidationError) -> Failure:
    errs = e.errors(include_url=False)
    extra = [str(x["loc"][0]) for x in errs if x["type"] == "extra_forbidden" and x["loc"]]
    if extra:
        name = extra[0]
        if name in UNSUPPORTED:
            return bad_request(
                f"unsupported field {name!r}: {UNSUPPORTED[name]}", code="unsupported_parameter", param=name
            )
        return bad_request(
            f"unknown field {name!r}"
            + (f" (and {', '.join(map(repr, extra[1:]))})" if extra[1:] else "")
            + "; fields: model, input, encoding_format, user",
            code="unknown_parameter",
            param=name,
        )
    first = errs[0]
    loc = [str(p) for p in first.get("loc", ())]
    field = loc[0] if loc else None
    if first["type"] == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if field == "input":
        return bad_request(
            "'input' must be a string or a list of strings (token-id inputs are not supported)",
            param="input",
        )
    if first["type"] == "missing":
        return bad_request(f"'{field}' is required", param=field)
    return bad_request(f"'{'.'.join(loc)}': {first.get('msg', 'invalid')}", param=field)


__all__ = ["UNSUPPORTED", "EmbeddingRequest", "parse_embedding_request"]
