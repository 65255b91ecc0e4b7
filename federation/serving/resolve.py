"""What a request's ``model`` names: an adapter, the base model, or ``auto`` (pure rules).

``model`` may be an adapter name (the version loaded under it: the newest), ``name@version``,
a card digest, the base model id (no adapter), or ``auto`` (the router picks per input). An
unknown model is a 404, never a fall-back to the base. The adapters are given as
`Engine.adapters` returns them, so resolving is a pure function of one view of the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import Failure, model_not_found

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Target:
    """What one input runs on: an adapter (name, version, digest) or the base model (all None)."""

    name: str | None = None
    version: int | None = None
    digest: str | None = None

    @property
    def is_base(self) -> bool:
        return self.digest is None

    def label(self, base_id: str) -> str:
        """``name@version``, or the base model id."""
        return base_id if self.name is None else f"{self.name}@{self.version}"


BASE = Target()


def resolve_model(model: str, adapters: Mapping[str, Mapping[str, Any]], base_id: str) -> Target | Failure:
    """The target `model` names (not ``auto``: the caller routes that), or a 404 Failure."""
    if model == base_id:
        return BASE
    a = adapters.get(model)
    if a is not None:
        return Target(model, int(a["version"]), str(a["digest"]))
    name, sep, ver = model.rpartition("@")
    if sep and name:
        a = adapters.get(name)
        if a is not None and ver.isdigit() and int(ver) == int(a["version"]):
            return Target(name, int(a["version"]), str(a["digest"]))
        if a is not None:
            f = model_not_found(model, known_models(adapters, base_id))
            return dataclasses.replace(
                f,
                message=f"version {ver} of {name!r} is not loaded here (loaded: {name}@{a['version']}); "
                + f.message,
            )
    for n, a in adapters.items():
        if a["digest"] == model:
            return Target(n, int(a["version"]), str(a["digest"]))
    return model_not_found(model, known_models(adapters, base_id))


def known_models(adapters: Mapping[str, Mapping[str, Any]], base_id: str) -> list[str]:
    return [base_id, AUTO, *sorted(adapters)]


def models_list(adapters: Mapping[str, Mapping[str, Any]], base_id: str, created: int) -> dict[str, Any]:
    """GET /v1/models: the base model, then every loaded adapter (OpenAI's list shape)."""
    data: list[dict[str, Any]] = [
        {"id": base_id, "object": "model", "created": created, "owned_by": "loraflight", "parent": None}
    ]
    for n in sorted(adapters):
        a = adapters[n]
        data.append(
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "loraflight",
                "parent": base_id,
                "root": base_id,
                "ref": a["ref"],
                "version": a["version"],
                "digest": a["digest"],
            }
        )
    return {"object": "list", "data": data}


__all__ = ["AUTO", "BASE", "Target", "known_models", "models_list", "resolve_model"]
