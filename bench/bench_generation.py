"""Text generation (tiny Llama, CPU): our API with per-request adapters vs a PEFT-switching server.

Run:  .venv/bin/python -m bench generation            (the full table)
      .venv/bin/python -m bench generation --quick    (a small run, about a minute)

The tiny chat Llama from config (`tiny_chat_llama`, hidden 64, 2 layers, MiniLM's 30,522-token
vocabulary), its EOS disabled so every request generates exactly --max-tokens tokens (checked:
`usage.completion_tokens`), 4 LoRA adapters (rank 8 on q, k, v, o; random non-zero B) saved by
PEFT. --concurrency clients (threads, one keep-alive httpx connection each) send --requests
`/v1/completions` requests per run, temperature 0, no stop. Rows:
  ours  base / one adapter / 4 mixed   our API (`ApiServer` + `GenerationService`, continuous
        batching, mixed adapter rows in one forward) in its own process
  peft  base / one adapter / 4 mixed   FastAPI + uvicorn over one `PeftModel` with the same
        adapters: per request lock, `set_adapter` (base: `disable_adapter`), greedy decode with
        the KV cache, unlock; requests serialise on the lock, as such servers do
  inproc base / one adapter / 4 mixed  the same scheduler driven directly (no HTTP, no JSON),
        at most --concurrency requests outstanding: a reference, not a competitor
"4 mixed" spreads request i over adapter i mod 4. Targets: ours 4 mixed >= 0.8x ours base
tokens/s, >= 2x the PEFT-switching server (peft 4 mixed).

Fairness: every server is its own process with the same torch thread count (--threads, also
OMP_NUM_THREADS), the same weights (the same seed, rebuilt), the same adapter bytes (our cards
come from PEFT's folders through `from_peft`), the same prompts and token counts. Everything is
up at once, warmed up, and measured in alternation (every row once per run, in turn); each
figure is the median over --runs runs. One client process drives every HTTP server alike; on a
2-core machine it shares the CPU with the server it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._generation_servers import PROMPTS, adapter_names
from bench._serving_common import Children, child_env, log_tail, machine, versions

BASE_ID = "loraflight/tiny-chat-llama"
MODES = ("base", "one", "mixed")
MODE_LABEL = {"base": "base", "one": "one adapter", "mixed": "4 adapters mixed"}
KINDS = ("ours", "peft", "inproc")
KIND_LABEL = {
    "ours": "ours, HTTP API",
    "peft": "PeftModel server, set_adapter per request",
    "inproc": "ours in-process (scheduler, no HTTP)",
}
TARGET_VS_BASE = 0.8
TARGET_VS_PEFT = 2.0


@dataclass
class Run:
    wall: float
    tokens: int
    lat: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    p50: float = math.nan
    p99: float = math.nan

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall > 0 and not self.errors else 0.0


def pct(lat: list[float], q: float) -> float:
    if not lat:
        return math.nan
    s = sorted(lat)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def models_for(mode: str, n_adapters: int) -> list[str]:
    names = adapter_names(n_adapters)
    return {"base": [BASE_ID], "one": names[:1], "mixed": names}[mode]


# --------------------------------------------------------------------------- HTTP load


class Driver:
    """`concurrency` keep-alive clients against one server, reused across runs."""

    def __init__(self, url: str, concurrency: int, timeout: float) -> None:
        import httpx

        self.url = url
        self.clients = [
            httpx.Client(base_url=url, timeout=timeout, trust_env=False) for _ in range(concurrency)
        ]
        self.texts: dict[tuple[str, int], str] = {}  # (model, prompt index) -> the generated text

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def run(self, models: list[str], requests: int, max_tokens: int) -> Run:
        lock = threading.Lock()
        nxt = [0]
        lat: list[float] = []
        errors: list[str] = []
        tokens = [0]

        def worker(client: Any) -> None:
            while True:
                with lock:
                    i = nxt[0]
                    if i >= requests:
                        return
                    nxt[0] += 1
                model, p = models[i % len(models)], i % len(PROMPTS)
                body = {"model": model, "prompt": PROMPTS[p], "max_tokens": max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                try:
                    r = client.post("/v1/completions", json=body)
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    out = r.json()
                    got = int(out["usage"]["completion_tokens"])
                    if got != max_tokens:
                        raise RuntimeError(f"{got} completion tokens, not {max_tokens} (EOS not disabled?)")
                except Exception as e:  # counted and reported in the table
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    lat.append(dt)
                    tokens[0] += got
                    self.texts.setdefault((model, p), out["choices"][0]["text"])

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in self.clients]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
            if t.is_alive():
                raise TimeoutError(f"a client against {self.url} is still waiting after 900 s")
        wall = time.perf_counter() - start
        return Run(
            wall, tokens[0], lat, len(errors), errors[0] if errors else "", pct(lat, 0.5), pct(lat, 0.99)
        )


class Inproc:
    """The in-process worker: one JSON line per run, answered within a bound."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"the in-process worker gave no answer within {timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the in-process worker exited ({self.proc.poll()}): {log_tail(self.log)}")
            try:
                return json.loads(line)
            except ValueError:
                continue  # something a library printed: not our answer

    def run(self, models: list[str], requests: int, concurrency: int, max_tokens: int) -> Run:
        assert self.proc.stdin is not None
        req = {"models": models, "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        r = self.read(900)
        return Run(
            float(r["wall"]), int(r["tokens"]), [], int(r["errors"]), "", float(r["p50"]), float(r["p99"])
        )


# --------------------------------------------------------------------------- starting things


def _common_args(a: argparse.Namespace) -> list[str]:
    return [
        "--threads", str(a.threads), "--adapters", str(a.adapters), "--hidden", str(a.hidden),
        "--layers", str(a.layers), "--max-tokens", str(a.max_tokens), "--max-batch", str(a.concurrency),
    ]  # fmt: skip


def _wait_port(proc: subprocess.Popen, port_file: Path, log: Path, timeout: float = 180.0) -> int:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{log.stem} exited ({proc.returncode}): {log_tail(log, 6)}")
        if port_file.is_file():
            port = int(port_file.read_text())
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code
                    == 200
                ):
                    return port
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise SystemExit(f"{log.stem}: no answer on /health within {timeout:.0f} s: {log_tail(log)}")


def _start(kind: str, work: Path, children: Children, a: argparse.Namespace) -> Any:
    argv = [sys.executable, "-m", "bench._generation_servers", kind, "--peft-root", str(work / "peft")]
    port_file, log = work / f"{kind}.port", work / f"{kind}.log"
    argv += ["--port-file", str(port_file), *_common_args(a)]
    proc = children.start(argv, env=child_env(a.threads), log=log, stdin=kind == "inproc")
    return proc, port_file, log


def _prepare(work: Path, children: Children, a: argparse.Namespace) -> None:
    argv = [
        sys.executable,
        "-m",
        "bench._generation_servers",
        "prepare",
        "--out",
        str(work),
        *_common_args(a),
    ]
    log = work / "prepare.log"
    p = children.start(argv, env=child_env(a.threads), log=log)
    try:
        rc = p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        raise SystemExit("preparing the adapters took over 300 s") from None
    if rc != 0:
        raise SystemExit(f"preparing the adapters failed ({rc}): {log_tail(log, 6)}")


# --------------------------------------------------------------------------- the table


def _fmt(x: float, nd: int = 0) -> str:
    return "—" if not math.isfinite(x) or x == 0 else f"{x:,.{nd}f}"


def paired(res: dict[tuple[str, str], list[Run]], num: tuple[str, str], den: tuple[str, str]) -> float:
    """The median over runs of num's tokens/s over den's in the same run (NaN without both)."""
    rs = [a.tps / b.tps for a, b in zip(res.get(num, []), res.get(den, []), strict=False) if a.tps and b.tps]
    return statistics.median(rs) if rs else math.nan


def report(res: dict[tuple[str, str], list[Run]], a: argparse.Namespace, match: str) -> list[str]:
    med: dict[tuple[str, str], dict[str, float]] = {}
    for key, runs in res.items():
        ok = [r for r in runs if not r.errors]
        med[key] = {
            "tps": statistics.median(r.tps for r in ok) if ok else math.nan,
            "p50": statistics.median(r.p50 for r in ok) * 1e3 if ok else math.nan,
            "p99": statistics.median(r.p99 for r in ok) * 1e3 if ok else math.nan,
            "errors": sum(r.errors for r in runs),
        }
    ours_base = med.get(("ours", "base"), {}).get("tps", math.nan)
    peft_mixed = med.get(("peft", "mixed"), {}).get("tps", math.nan)
    lines = [
        f"{a.concurrency} concurrent clients × {a.requests} requests per run × {a.max_tokens} new tokens, "
        f"median of {a.runs} runs after a warm-up, torch threads {a.threads}",
        "",
        "| system | adapters | tokens/s | p50 ms | p99 ms | × ours base | × PEFT switching |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in KINDS:
        for mode in MODES:
            m = med.get((kind, mode))
            if m is None:
                continue
            vb = m["tps"] / ours_base if ours_base else math.nan
            vp = m["tps"] / peft_mixed if peft_mixed else math.nan
            err = f" ({m['errors']:.0f} errors)" if m["errors"] else ""
            lines.append(
                f"| {KIND_LABEL[kind]} | {MODE_LABEL[mode]}{err} | {_fmt(m['tps'])} | {_fmt(m['p50'])} | "
                f"{_fmt(m['p99'])} | {_fmt(vb, 2)} | {_fmt(vp, 2)} |"
            )
    mixed = med.get(("ours", "mixed"), {}).get("tps", math.nan)
    r_base = mixed / ours_base if ours_base else math.nan
    r_peft = mixed / peft_mixed if peft_mixed else math.nan
    p_base = paired(res, ("ours", "mixed"), ("ours", "base"))
    p_peft = paired(res, ("ours", "mixed"), ("peft", "mixed"))
    lines += [
        "",
        "ratios: of the medians above; in brackets the median of per-run ratios (rows of one run",
        "are measured back to back, so these cancel the drift of a shared machine)",
        f"ours 4 mixed / ours base: {r_base:.2f}× [{p_base:.2f}×] (target ≥ {TARGET_VS_BASE}×: "
        f"{'met' if min(r_base, p_base) >= TARGET_VS_BASE else 'NOT met'})",
        f"ours 4 mixed / PEFT switching: {r_peft:.2f}× [{p_peft:.2f}×] (target ≥ {TARGET_VS_PEFT}×: "
        f"{'met' if min(r_peft, p_peft) >= TARGET_VS_PEFT else 'NOT met'})",
        f"greedy texts, ours vs PEFT, same (model, prompt): {match}",
    ]
    return lines


def _compare(ours: Driver, peft: Driver) -> str:
    keys = sorted(set(ours.texts) & set(peft.texts))
    # ours continues the prompt's text (a leading space); PEFT's decode of the new ids alone has none
    differ = [k for k in keys if ours.texts[k].strip() != peft.texts[k].strip()]
    out = f"{len(keys) - len(differ)}/{len(keys)} identical"
    if differ:
        k = differ[0]
        out += f"; first that differs, {k}: ours {ours.texts[k][:60]!r} vs PEFT {peft.texts[k][:60]!r}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench generation", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per row, alternating (default 5; at least 3)")
    ap.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    ap.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per server"
    )
    ap.add_argument("--adapters", type=int, default=4, help="adapters in the mixed rows (default 4)")
    ap.add_argument("--hidden", type=int, default=64, help="the tiny Llama's hidden size (default 64)")
    ap.add_argument("--layers", type=int, default=2, help="the tiny Llama's layers (default 2)")
    ap.add_argument("--quick", action="store_true", help="3 runs of 16 requests")
    ap.add_argument("--only", default="", help="comma-separated kinds: ours,peft,inproc (default all)")
    a = ap.parse_args(argv)
    if a.quick:
        a.runs, a.requests = 3, 2 * a.concurrency
    if a.runs < 1 or a.requests < 1 or a.concurrency < 1 or a.max_tokens < 1 or a.adapters < 1:
        ap.error("--runs, --requests, --concurrency, --max-tokens and --adapters must be positive")
    kinds = [k for k in KINDS if not a.only or k in a.only.split(",")]
    if not kinds:
        ap.error(f"--only names none of {', '.join(KINDS)}")

    print(machine("at start"), flush=True)
    print(versions(), flush=True)
    children = Children()
    drivers: dict[str, Driver] = {}
    inproc: Inproc | None = None
    res: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="lf-genbench-") as tmp:
        work = Path(tmp)
        try:
            _prepare(work, children, a)
            started = {k: _start(k, work, children, a) for k in kinds}
            for k, (proc, port_file, log) in started.items():
                if k == "inproc":
                    inproc = Inproc(proc, log)
                    inproc.read(180)  # its "ready" line
                else:
                    port = _wait_port(proc, port_file, log)
                    drivers[k] = Driver(f"http://127.0.0.1:{port}", a.concurrency, timeout=600)

            def one(kind: str, mode: str, requests: int) -> Run:
                models = models_for(mode, a.adapters)
                if kind == "inproc":
                    assert inproc is not None
                    return inproc.run(models, requests, a.concurrency, a.max_tokens)
                return drivers[kind].run(models, requests, a.max_tokens)

            rows = [(k, m) for k in kinds for m in MODES]
            for k, m in rows:  # warm-up: every row once
                r = one(k, m, a.concurrency)
                if r.errors:
                    print(f"warm-up {k} {m}: {r.errors} errors, first: {r.first_error}", flush=True)
            for i in range(a.runs):
                for k, m in rows:
                    r = one(k, m, a.requests)
                    res.setdefault((k, m), []).append(r)
                    err = f", {r.errors} errors ({r.first_error})" if r.errors else ""
                    print(
                        f"run {i + 1} {k:6} {m:5}: {r.tps:8,.0f} tokens/s, p50 {r.p50 * 1e3:6.0f} ms{err}",
                        flush=True,
                    )
            match = _compare(drivers["ours"], drivers["peft"]) if {"ours", "peft"} <= drivers.keys() else "-"
        finally:
            for d in drivers.values():
                d.close()
            children.close()
    print()
    print("\n".join(report(res, a, match)))
    print()
    print(machine("at end"), flush=True)
    return 0


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
