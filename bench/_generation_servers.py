"""The generation benchmark's processes: `prepare` (the PEFT adapters, saved by PEFT), `ours`
(the API over a `GenerationService`), `peft` (FastAPI + uvicorn over a `PeftModel`, lock +
`set_adapter` + greedy cached decode per request) and `inproc` (the scheduler driven directly,
no HTTP; a JSON-lines worker on stdin/stdout).

Every process builds the same tiny chat Llama (`tiny_chat_llama(seed)`, deterministic) with its
EOS disabled, so every request generates exactly `max_tokens` tokens, and uses the same adapter
bytes: the PEFT folders `prepare` wrote (ours reads them through `peft_io.from_peft`).

Run as `python -m bench._generation_servers KIND ...` (the benchmark starts them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPTS = (
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "a",
    "adapters share one forward",
    "tokens per second on two cores",
    "once upon a time there was a model",
    "why",
    "mixed rows with padding and masks",
)


def adapter_names(n: int) -> list[str]:
    return [f"skill{i}" for i in range(n)]


def tiny_lm(seed: int, hidden: int, layers: int) -> Any:
    """The tiny chat Llama with no EOS: generation always runs to `max_tokens`."""
    from loraflight.engine.generate.models import tiny_chat_llama

    lm = tiny_chat_llama(seed, hidden=hidden, layers=layers)
    return dataclasses.replace(lm, eos_token_ids=())


def prepare(out: Path, n: int, seed: int, hidden: int, layers: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    lm = tiny_lm(seed, hidden, layers)
    torch.manual_seed(4321)
    pm = None
    for name in adapter_names(n):
        cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(lm.model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    assert pm is not None
    pm.save_pretrained(out / "peft")
    # PEFT saves the first adapter at the root unless it is named "default": every one in its folder
    for name in adapter_names(n):
        if not (out / "peft" / name / "adapter_config.json").is_file():
            raise SystemExit(f"PEFT did not save {name} under {out / 'peft' / name}")
    print("prepared", flush=True)


def _bind() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


def _write_port(path: Path, port: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


def _engine_rig(a: argparse.Namespace) -> tuple[Any, Any]:
    from loraflight.engine import Engine
    from loraflight.engine.card import CardMeta
    from loraflight.engine.peft_io import from_peft

    lm = tiny_lm(a.seed, a.hidden, a.layers)
    engine = Engine(lm.model)
    for name in adapter_names(a.adapters):
        card = from_peft(Path(a.peft_root) / name, meta=CardMeta(name))
        engine.load(card, activate=False)
    return lm, engine


def serve_ours(a: argparse.Namespace) -> None:
    from loraflight.federation.serving.generation import GenerationService
    from loraflight.federation.serving.server import ApiServer

    lm, engine = _engine_rig(a)
    svc = GenerationService(lm, engine, max_tokens=a.max_tokens, max_batch=a.max_batch, queue=256)
    server = ApiServer(None, "127.0.0.1:0", generation=svc).start()
    try:
        port = server.port
        if port is None:
            raise SystemExit("the API server did not report its port")
        _write_port(Path(a.port_file), port)
        print(f"ours on {server.url}, base id {svc.base_id}", flush=True)
        threading.Event().wait()  # until SIGTERM
    finally:
        server.stop()
        svc.close()


def _greedy(pm: Any, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids`, one cached forward per token (no EOS)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        r = pm(input_ids=torch.tensor([ids]), use_cache=True)
        past = r.past_key_values
        tok = int(torch.argmax(r.logits[0, -1]))
        out.append(tok)
        while len(out) < n:
            r = pm(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = r.past_key_values
            tok = int(torch.argmax(r.logits[0, -1]))
            out.append(tok)
    return out


def serve_peft(a: argparse.Namespace) -> None:
    import torch
    import uvicorn
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse
    from peft import PeftModel

    from loraflight.engine.generate.models import encode_prompt

    torch.set_num_threads(a.threads)
    lm = tiny_lm(a.seed, a.hidden, a.layers)
    names = adapter_names(a.adapters)
    root = Path(a.peft_root)
    pm = PeftModel.from_pretrained(lm.model, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(root / name, adapter_name=name)
    pm.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any] = Body(...)) -> JSONResponse:
        model, prompt = str(body["model"]), str(body["prompt"])
        n = min(int(body.get("max_tokens", 16)), a.max_tokens)
        if model != lm.model_id and model not in names:
            return JSONResponse({"error": {"message": f"unknown model {model!r}"}}, status_code=404)

        def work() -> tuple[list[int], str]:
            with lm.lock:
                ids = encode_prompt(lm.tokenizer, prompt)
            with lock:  # one request at a time on the one PeftModel
                if model == lm.model_id:
                    with pm.disable_adapter():
                        toks = _greedy(pm, ids, n)
                else:
                    pm.set_adapter(model)
                    toks = _greedy(pm, ids, n)
            with lm.lock:  # the text continues the prompt's (a completion), like ours
                head = lm.tokenizer.decode(ids, skip_special_tokens=True)
                full = lm.tokenizer.decode(ids + toks, skip_special_tokens=True)
            text = full[len(head) :] if full.startswith(head) else full
            return ids, text

        from starlette.concurrency import run_in_threadpool

        ids, text = await run_in_threadpool(work)
        use = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        return JSONResponse({"object": "text_completion", "model": model, "choices": [choice], "usage": use})

    sock = _bind()
    _write_port(Path(a.port_file), int(sock.getsockname()[1]))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def _pct(lat: list[float], q: float) -> float:
    if not lat:
        return math.nan
    s = sorted(lat)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _inproc_once(
    sched: Any, prompts: list[list[int]], models: list[str | None], n: int, conc: int, params: Any
) -> dict[str, Any]:
    """One run: `n` requests, at most `conc` outstanding, round-robin over `models` and `prompts`."""
    lat: list[float] = []
    count = {"tokens": 0, "errors": 0, "left": n}
    seen: set[int] = set()
    guard = threading.Lock()
    sem = threading.Semaphore(conc)
    done = threading.Event()

    def listener(t0: float) -> Any:
        def notify(h: Any) -> None:
            if not h.done:
                return
            with guard:
                if h.id in seen:
                    return
                seen.add(h.id)
                lat.append(time.perf_counter() - t0)
                try:
                    count["tokens"] += len(h.result(0).token_ids)
                except Exception:
                    count["errors"] += 1
                count["left"] -= 1
                if count["left"] == 0:
                    done.set()
            sem.release()

        return notify

    start = time.perf_counter()
    for i in range(n):
        if not sem.acquire(timeout=300):
            raise TimeoutError("the scheduler took over 300 s to finish a request")
        sched.submit(
            prompts[i % len(prompts)], params, models[i % len(models)], notify=listener(time.perf_counter())
        )
    if not done.wait(600):
        raise TimeoutError("the scheduler took over 600 s for one run")
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "tokens": count["tokens"],
        "errors": count["errors"],
        "p50": _pct(lat, 0.5),
        "p99": _pct(lat, 0.99),
    }


def run_inproc(a: argparse.Namespace) -> None:
    """Answer JSON lines `{"models": [...], "requests": N, "concurrency": C, "max_tokens": T}` with
    one run's figures: N requests submitted to the scheduler, at most C outstanding (like C clients)."""
    from loraflight.engine.generate.models import encode_prompt
    from loraflight.engine.generate.sampling import SamplingParams
    from loraflight.engine.generate.scheduler import GenerationScheduler

    lm, engine = _engine_rig(a)
    sched = GenerationScheduler.for_engine(engine, lm, max_batch=a.max_batch, max_waiting=256)
    prompts = [encode_prompt(lm.tokenizer, p) for p in PROMPTS]
    print(json.dumps({"ready": True, "base_id": lm.model_id}), flush=True)
    try:
        for line in sys.stdin:
            req = json.loads(line)
            models: list[str | None] = [None if m == lm.model_id else m for m in req["models"]]
            params = SamplingParams(max_tokens=int(req["max_tokens"]), temperature=0.0)
            out = _inproc_once(sched, prompts, models, int(req["requests"]), int(req["concurrency"]), params)
            print(json.dumps(out), flush=True)
    finally:
        sched.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench._generation_servers")
    ap.add_argument("kind", choices=("prepare", "ours", "peft", "inproc"))
    ap.add_argument("--out", default="")
    ap.add_argument("--peft-root", default="")
    ap.add_argument("--port-file", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.kind == "prepare":
        prepare(Path(a.out), a.adapters, a.seed, a.hidden, a.layers)
    elif a.kind == "ours":
        serve_ours(a)
    elif a.kind == "peft":
        serve_peft(a)
    else:
        run_inproc(a)


__all__ = ["PROMPTS", "adapter_names", "main", "prepare", "tiny_lm"]

if __name__ == "__main__":
    main()
