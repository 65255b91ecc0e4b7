"""Shared pieces of the serving tests: a tiny served model, cards made here, references."""

from __future__ import annotations

import base64
import threading

import numpy as np
import openai

from loraflight.engine import LoRACard, ModuleLoRA
from loraflight.engine.authoring.router import HashingEmbedder
from loraflight.engine.authoring.serving_model import TINY_ID, ServingModel, build_serving_model
from loraflight.federation.config import load_config
from loraflight.federation.serving import ApiServer, start_api
from loraflight.federation.serving.encoder import encode_rows

HIDDEN, LAYERS = 64, 2
TOL = 1e-5


def tiny() -> ServingModel:
    return build_serving_model("tiny:0")


def card(name: str, version: int, seed: int, description: str = "", scale: float = 0.6) -> LoRACard:
    """A rank-4 card on every query/value projection of the tiny encoder."""
    rng = np.random.default_rng(seed)
    mods = []
    for i in range(LAYERS):
        for proj in ("query", "value"):
            mods.append(
                ModuleLoRA(
                    f"encoder.layer.{i}.attention.self.{proj}",
                    4,
                    4.0,
                    (rng.standard_normal((4, HIDDEN)) * scale).astype(np.float32),
                    (rng.standard_normal((HIDDEN, 4)) * scale).astype(np.float32),
                )
            )
    return LoRACard.build(mods, name=name, version=version, base_model=TINY_ID, description=description)


class Reference:
    """Each input run alone, in-process, on a separate engine with the card (or the base)."""

    def __init__(self) -> None:
        self.sm = tiny()
        self._cache: dict[tuple[str | None, str], np.ndarray] = {}

    def __call__(self, c: LoRACard | None, text: str) -> np.ndarray:
        key = (None if c is None else c.digest, text)
        got = self._cache.get(key)
        if got is None:
            eng = self.sm.engine
            name = None
            if c is not None:
                name = "ref"
                if eng.adapters.get("ref", {}).get("digest") != c.digest:
                    eng.load(c, name="ref")
            ids = self.sm.tokenizer([text])["input_ids"]
            got = self._cache[key] = encode_rows(self.sm, ids, [name])[0]
        return got


def max_diff(a: object, b: object) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def serve(sm, **flags) -> ApiServer:
    cfg = load_config(env={}, flags={"api.listen": "127.0.0.1:0", **flags})
    return start_api(model=sm, config=cfg, router_embedder=HashingEmbedder())


def client(server: ApiServer, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def wait_until(pred, timeout: float = 30.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        ev.wait(0.01)
    raise AssertionError("timed out waiting for the condition")


def vec(d) -> np.ndarray:
    if isinstance(d.embedding, str):  # asked for base64 explicitly: the client leaves it encoded
        return np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
    return np.asarray(d.embedding, dtype=np.float32)


__all__ = ["HIDDEN", "TOL", "Reference", "card", "client", "max_diff", "serve", "tiny", "vec", "wait_until"]
