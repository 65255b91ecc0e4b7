"""Our side of the serving benchmark: a real `loraflight node run` in a subprocess, its 4 cards
published over Flight, its embeddings API waited for until `/v1/models` lists them all.

`start_node` returns a `Node`, or a one-line reason why ours cannot be measured (the config
refused `[api]`, the node exited, the API never answered): the table then says
"not available: <reason>" for ours, (a) and do_exchange instead of failing the whole run.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._serving_common import BASE_ID, Children, child_env, free_port, log_tail


@dataclass
class Node:
    api_url: str  # http://127.0.0.1:PORT
    flight_uri: str  # grpc://127.0.0.1:PORT
    base_id: str  # the `model` that means "no adapter"
    models: list[str]  # the adapter names /v1/models listed
    log: Path


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("loraflight")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "from loraflight.federation.cli import console_main; console_main()"]


def config_toml(
    store: Path, flight_port: int, api_port: int, token: str, max_batch: int, max_wait_ms: float
) -> str:
    """The node's TOML: loopback only, no discovery or sync, MiniLM engine hot-loading any card."""
    return "\n".join(
        [
            f"store = {json.dumps(str(store))}",
            f'listen = "grpc://127.0.0.1:{flight_port}"',
            'fleet = "bench-serving"',
            "",
            "[tokens]",
            f"write = [{json.dumps(token)}]",
            "",
            "[trust]",
            'engine = "any"',
            "",
            "[discovery]",
            "enabled = false",
            "",
            "[sync]",
            "enabled = false",
            "",
            "[engine]",
            'base_model = "minilm"',
            "",
            "[log]",
            'level = "WARNING"',
            "",
            "[api]",
            f'listen = "127.0.0.1:{api_port}"',
            f"max_batch = {int(max_batch)}",
            # an integral wait is written as an int: a float key accepts it, an int key would refuse 5.0
            f"max_wait_ms = {int(max_wait_ms) if float(max_wait_ms).is_integer() else max_wait_ms!r}",
            "",
        ]
    )


def _get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    import httpx

    try:
        r = httpx.get(url, timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return 0, None
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


def _listed(body: Any) -> list[dict[str, Any]]:
    data = body.get("data") if isinstance(body, dict) else None
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def start_node(
    children: Children,
    workdir: Path,
    cards: list[Path],
    names: list[str],
    *,
    threads: int,
    max_batch: int,
    max_wait_ms: float,
    timeout: float = 180.0,
) -> Node | str:
    """Start the node, publish `cards`, wait until `/v1/models` lists every one of `names`."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = "bench-" + secrets.token_hex(12)
    token_file = workdir / "write.token"
    token_file.write_text(token + "\n")
    flight_port, api_port = free_port(), free_port()
    cfg = workdir / "node.toml"
    cfg.write_text(config_toml(workdir / "store", flight_port, api_port, token, max_batch, max_wait_ms))
    log = workdir / "node.log"
    env = child_env(threads)
    proc = children.start([*_cli(), "node", "run", "-c", str(cfg)], env=env, log=log)
    api = f"http://127.0.0.1:{api_port}"
    flight = f"grpc://127.0.0.1:{flight_port}"

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log_tail(log)
            if "unknown key 'api'" in tail:
                return "this node's config has no [api] table (the embeddings API is not in this build)"
            return f"the node exited ({proc.returncode}): {tail}"
        status, _ = _get_json(api + "/health", timeout=2.0)
        if status == 200:
            break
        if time.monotonic() > deadline:
            return f"the node's API did not answer on {api}/health within {timeout:.0f} s: {log_tail(log)}"
        time.sleep(0.25)

    for card in cards:
        try:
            r = subprocess.run(
                [*_cli(), "publish", str(card), "--to", flight, "--token-file", str(token_file)],
                env=env,
                capture_output=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"publishing {card.name} took over 120 s"
        if r.returncode != 0:
            err = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
            return f"publishing {card.name} failed: {err[-1] if err else r.returncode}"

    want = set(names)
    listed: list[dict[str, Any]] = []
    while True:
        if proc.poll() is not None:
            return f"the node exited ({proc.returncode}) after publishing: {log_tail(log)}"
        status, body = _get_json(api + "/v1/models")
        listed = _listed(body) if status == 200 else []
        have = {str(d.get("id", "")) for d in listed}
        have |= {str(d.get("ref", "")).split("@", 1)[0] for d in listed}
        if want <= have:
            break
        if time.monotonic() > deadline:
            return (
                f"/v1/models listed {sorted(have) or 'nothing'} after {timeout:.0f} s, "
                f"not all of {sorted(want)}: {log_tail(log)}"
            )
        time.sleep(0.25)
    base = BASE_ID
    ids = {str(d.get("id", "")) for d in listed}
    # the node may name its base differently (engine.model_id): take the entry without a parent
    if base not in ids:
        roots = [str(d["id"]) for d in listed if not d.get("parent") and str(d.get("id")) not in want]
        base = roots[0] if roots else base
    return Node(api, flight, base, sorted(want), log)


__all__ = ["Node", "config_toml", "start_node"]
