"""Pure rules of `api.push`: which servers, which calls bring a server to what the node admits.

No threads, no sockets: `push.Pusher` applies these with an HTTP client.

The runtime APIs relied on (from the servers' documentation; they run on GPUs, so tests run a
stand-in that implements exactly this):

* vLLM (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): ``POST /v1/load_lora_adapter``
  ``{"lora_name", "lora_path"}`` (400 when the name is loaded already), ``POST
  /v1/unload_lora_adapter`` ``{"lora_name"}``; ``GET /v1/models`` lists the base model and
  every adapter, an adapter with ``parent`` = the base model and ``root`` = its path.
* SGLang (``--enable-lora``): ``POST /load_lora_adapter`` ``{"lora_name", "lora_path"}``,
  ``POST /unload_lora_adapter`` ``{"lora_name"}``; ``GET /v1/models`` as above.

A replacement is an unload then a load (vLLM's ``load_inplace`` is only in recent releases;
unload + load works on every release of both servers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from loraflight.errors import ConfigError

ENDPOINTS: dict[str, dict[str, str]] = {
    "vllm": {"load": "/v1/load_lora_adapter", "unload": "/v1/unload_lora_adapter", "models": "/v1/models"},
    "sglang": {"load": "/load_lora_adapter", "unload": "/unload_lora_adapter", "models": "/v1/models"},
}


@dataclasses.dataclass(frozen=True)
class PushTarget:
    """One server to push to: its kind ('vllm' or 'sglang') and base URL (``http://host:port``)."""

    kind: str
    base_url: str

    @property
    def label(self) -> str:
        return f"{self.kind}+{self.base_url}"

    def url(self, op: str) -> str:
        return self.base_url + ENDPOINTS[self.kind][op]


def parse_push(spec: str) -> PushTarget:
    """``vllm+http://host:port`` or ``sglang+http://host:port`` (https too) -> PushTarget."""
    kind, plus, rest = spec.strip().partition("+")
    what = f"api.push: {spec!r}"
    if not plus or kind not in ENDPOINTS:
        raise ConfigError(f"{what} should be vllm+http://HOST:PORT or sglang+http://HOST:PORT")
    u = urlsplit(rest)
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme not in ("http", "https") or not u.hostname or port is None:
        raise ConfigError(f"{what}: give the server's address as {kind}+http://HOST:PORT")
    if u.path not in ("", "/") or u.query or u.fragment or u.username:
        raise ConfigError(f"{what}: no path, query or user part; give {kind}+http://HOST:PORT")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return PushTarget(kind, f"{u.scheme}://{host}:{port}")


def push_problems(specs: Iterable[str], interval: float) -> list[str]:
    """Every problem of the push settings (the node checks at start that export_dir is set)."""
    p: list[str] = []
    seen: set[str] = set()
    for s in specs:
        try:
            t = parse_push(s)
        except ConfigError as e:
            p.append(str(e))
            continue
        if t.label in seen:
            p.append(f"api.push: {s!r} is given twice")
        seen.add(t.label)
    if not 0 < interval <= 86400:
        p.append(f"api.push_interval: {interval} must be > 0 and at most 86400 seconds")
    return p


@dataclasses.dataclass(frozen=True)
class Call:
    """One runtime-API call: load `name` from `path`, or unload `name`."""

    op: str  # "load" | "unload"
    name: str
    path: str | None = None

    def body(self) -> dict[str, Any]:
        if self.op == "load":
            return {"lora_name": self.name, "lora_path": self.path}
        return {"lora_name": self.name}


def listed_adapters(listing: Any) -> dict[str, str | None]:
    """Adapters in a ``GET /v1/models`` answer: name -> path (``root``; None when not given).

    An adapter is an entry with a ``parent`` (the base model has none). Raises ValueError when
    the answer is not the OpenAI list shape.
    """
    if not isinstance(listing, Mapping) or not isinstance(listing.get("data"), list):
        raise ValueError("GET /v1/models did not answer {'data': [...]}")
    out: dict[str, str | None] = {}
    for m in listing["data"]:
        if isinstance(m, Mapping) and isinstance(m.get("id"), str) and m.get("parent"):
            root = m.get("root")
            out[m["id"]] = root if isinstance(root, str) else None
    return out


def plan(
    desired: Mapping[str, str], actual: Mapping[str, str | None], pushed: Mapping[str, str]
) -> list[Call]:
    """The calls that turn the server's adapters (`actual`, from /v1/models) into `desired`
    (name -> path as the server sees it): unloads first, then loads.

    A name the server holds from another path is replaced (unload, load); when the listing
    gives no path, what this node pushed last (`pushed`) stands in for it, and a name the node
    never pushed is replaced once so its path is known. A name the node pushed and no longer
    wants is unloaded even when the listing does not show it (a server that lists no adapters).
    """
    gone = (set(actual) | set(pushed)) - set(desired)  # pushed: also when the listing omits it
    calls: list[Call] = [Call("unload", n) for n in sorted(gone)]
    for name in sorted(desired):
        path = desired[name]
        if name not in actual:
            calls.append(Call("load", name, path))
            continue
        held = actual[name] if actual[name] is not None else pushed.get(name)
        if held != path:
            calls += [Call("unload", name), Call("load", name, path)]
    return calls


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): doubling from `base`, at most `cap`."""
    return min(cap, base * (2 ** max(0, attempt - 1)))


def read_token(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace stripped); ConfigError when unusable."""
    import os

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            tok = f.read().strip()
    except OSError as e:
        raise ConfigError(f"api.push_token_file: cannot read {path!r}: {e.strerror or e}") from None
    if not tok or any(c.isspace() for c in tok) or not tok.isprintable():
        raise ConfigError(f"api.push_token_file: {path!r} must hold one token (printable, no spaces)")
    return tok


__all__ = [
    "ENDPOINTS",
    "Call",
    "PushTarget",
    "backoff",
    "listed_adapters",
    "parse_push",
    "plan",
    "push_problems",
    "read_token",
]
