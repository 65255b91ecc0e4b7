"""Pure checks of the serving settings: the API's listen address, its limits, the engine device.

`federation.config` runs them while validating a config; they return problems as text
(every problem listed, none raised). `device_problem` imports torch, so config validation
calls it only when an engine is configured.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_listen(value: str, what: str, problems: list[str]) -> tuple[str, int] | str | None:
    """An HTTP listen address: (host, port) for ``HOST:PORT`` / ``[v6]:PORT``, the path for a
    Unix socket (an absolute path), or None after a problem."""
    v = value.strip()
    if v.startswith("/"):
        if len(v.encode()) > 100:  # sun_path is 108 bytes on Linux
            problems.append(f"{what}: the Unix socket path {v!r} is longer than 100 bytes")
            return None
        return v
    if "://" in v:
        problems.append(f"{what}: {value!r} should be HOST:PORT (no scheme), e.g. 127.0.0.1:8000")
        return None
    host, sep, port_s = v.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not sep or not host or not (0 <= port < 65536):
        problems.append(f"{what}: {value!r} is not HOST:PORT with a port in 0..65535 (0: any free port)")
        return None
    return host, port


_API_BOUNDS = {
    "max_batch": (1, 65536),
    "max_wait_ms": (0, 10_000),
    "queue": (1, 1_000_000),
    "max_inputs": (1, 1_000_000),
    "max_input_tokens": (0, 1_000_000),
    "max_body_bytes": (1, 1 << 31),
    "max_tokens": (1, 1_000_000),
    "max_connections": (1, 1_000_000),
    "header_timeout": (0.1, 3600),
    "body_timeout": (0.1, 3600),
    "keep_alive": (1, 3600),
    "max_header_bytes": (1, 1 << 20),
    "rate": (0, 1_000_000),
    "burst": (1, 1_000_000),
}


def api_problems(api: Any) -> list[str]:
    """Every problem of the [api] section (the node checks that it has an engine to serve)."""
    p: list[str] = []
    if api.listen:
        parse_listen(api.listen, "api.listen", p)
    for name, (lo, hi) in _API_BOUNDS.items():
        v = getattr(api, name)
        if not lo <= v <= hi:
            p.append(f"api.{name}: {v} is outside {lo}..{hi}")
    return p


def device_problem(device: str) -> str | None:
    """None when torch can use `device` here (imports torch, except for cpu)."""
    if device == "cpu":
        return None
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"{device!r} is asked for but CUDA is not available on this machine; use cpu"
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            return f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "'mps' is asked for but Apple's MPS backend is not available here; use cpu"
    return None


def base_model_problem(spec: str) -> str | None:
    """None when `spec` names a model this machine can load offline (built-in, folder, cached id)."""
    if (
        spec in ("minilm", "tiny-chat-llama")
        or re.fullmatch(r"tiny(:\d+)?", spec)
        or Path(os.path.expanduser(spec)).is_dir()
    ):
        return None
    if _HF_ID.fullmatch(spec):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return f"{spec!r} looks like a Hugging Face id, but huggingface_hub is not installed"
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return None
        return (
            f"{spec!r} is not in the local Hugging Face cache and nothing is downloaded; "
            f"fetch it beforehand (huggingface-cli download {spec}) or give a folder"
        )
    return f"{spec!r} is not 'minilm', 'tiny:SEED', 'tiny-chat-llama', an existing model folder or a cached org/name id"


__all__ = ["api_problems", "base_model_problem", "device_problem", "parse_listen"]
