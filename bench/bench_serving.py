"""Embeddings serving (MiniLM, CPU): our node's API vs PeftModel servers and sentence-transformers.

Run:  .venv/bin/python -m bench serving                  (the full table)
      .venv/bin/python -m bench serving --quick          (a small run, under a minute)
      .venv/bin/python -m bench serving --only b,c,d     (some systems only)

Concurrency 16, each request one ~12-word text, its adapter chosen round-robin over 4 LoRA
adapters (so requests for different adapters are in flight at once). Systems:
  ours  `loraflight node run` with `[api]`: cross-request batching, mixed adapter rows in one forward
  a     the same node, `model` = the base id (no adapter): the floor; target ours ≥ 0.85× (a)
  b     FastAPI + uvicorn, one PeftModel, per request lock + `set_adapter` + forward; target ≥ 3× (b)
  c     FastAPI + uvicorn, a PeftModel grouping queued requests per adapter, one batch per group
        (same max batch and max wait as ours); target ≥ 1.2× (c)
  d     sentence-transformers `encode` in-process, batches of --concurrency texts, base model, no
        HTTP: the compute's upper bound, not a competitor (its p50/p99 are per-batch times)
  exchange  10,000 texts through Flight `do_exchange` (batches of 1,000, per-row adapter column)
        vs the same texts through the HTTP API at concurrency 16, 64 texts per request: texts/s

Fairness: every server is its own process on 127.0.0.1 with the same torch thread count
(--threads: `torch.set_num_threads` in ours' competitors, OMP_NUM_THREADS for every child), the
same MiniLM weights, tokenizer, max_length (256), mean pooling + normalisation; the adapters are
the same bytes (PEFT folders saved by PEFT; our cards made from them with `from_peft`). All servers
are up at once and measured in alternation (ours a b c d, ours a b c d, ...) after a warm-up; each
figure is the median over --runs runs. One client process drives every HTTP server the same way
(threads, one keep-alive connection each); on a 2-core machine it shares the CPU with the server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._serving_common import (
    Children,
    adapter_names,
    child_env,
    log_tail,
    machine,
    make_texts,
    versions,
)
from bench._serving_load import Driver, Result, exchange, median
from bench._serving_node import Node, start_node

SYSTEMS = ("ours", "a", "b", "c", "d", "exchange")
LABELS = {
    "ours": "ours: node API, 4 adapters mixed",
    "a": "(a) node API, no adapter (floor)",
    "b": "(b) PeftModel, set_adapter per request",
    "c": "(c) PeftModel, grouped per adapter",
    "d": "(d) sentence-transformers encode, in-process",
}
TARGETS = {"a": 0.85, "b": 3.0, "c": 1.2}


@dataclass
class System:
    key: str
    driver: Driver | None = None
    proc: subprocess.Popen | None = None  # (d)'s worker
    models: list[str] = field(default_factory=list)
    missing: str = ""  # why it is not available
    flight_uri: str = ""  # exchange: the node's Flight address
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


# --------------------------------------------------------------------------- starting things


def _prepare(work: Path, children: Children, threads: int) -> None:
    argv = [sys.executable, "-m", "bench._serving_servers", "prepare", "--out", str(work)]
    log = work / "prepare.log"
    p = children.start(argv, env=child_env(threads), log=log)
    try:
        rc = p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        raise SystemExit("preparing the adapters took over 300 s") from None
    if rc != 0:
        raise SystemExit(f"preparing the adapters failed ({rc}): {log_tail(log, 6)}")


def _start_server(kind: str, work: Path, children: Children, a: argparse.Namespace) -> tuple[Any, Path, Path]:
    port_file = work / f"{kind}.port"
    log = work / f"{kind}.log"
    argv = [sys.executable, "-m", "bench._serving_servers", kind, "--peft-root", str(work / "peft")]
    argv += ["--port-file", str(port_file), "--threads", str(a.threads)]
    argv += ["--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)]
    return children.start(argv, env=child_env(a.threads), log=log), port_file, log


def _wait_server(proc: Any, port_file: Path, log: Path, timeout: float = 180.0) -> str | int:
    """The server's port once /health answers, or why not."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the server exited ({proc.returncode}): {log_tail(log)}"
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
    return f"no answer on /health within {timeout:.0f} s: {log_tail(log)}"


def _st_call(proc: subprocess.Popen, req: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """Send one JSON line to (d)'s worker (or none) and read its one-line answer, bounded."""
    assert proc.stdin is not None and proc.stdout is not None
    if req is not None:
        proc.stdin.write((json.dumps(req) + "\n").encode())
        proc.stdin.flush()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
        if not ready:
            raise TimeoutError(f"the sentence-transformers worker gave no answer within {timeout:.0f} s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the sentence-transformers worker exited ({proc.poll()})")
        try:
            answer = json.loads(line)
        except ValueError:
            continue  # something a library printed on stdout: not our answer
        if isinstance(answer, dict):
            return answer


def start_all(wanted: set[str], work: Path, children: Children, a: argparse.Namespace) -> dict[str, System]:
    names = adapter_names(4)
    systems = {k: System(k) for k in SYSTEMS if k in wanted}
    pending = {}
    for kind, key in (("switch", "b"), ("group", "c")):
        if key in systems:
            pending[key] = _start_server(kind, work, children, a)
    if "d" in systems:
        argv = [sys.executable, "-m", "bench._serving_servers", "st", "--threads", str(a.threads)]
        systems["d"].proc = children.start(argv, env=child_env(a.threads), log=work / "st.log", stdin=True)
    node: Node | str | None = None
    if wanted & {"ours", "a", "exchange"}:
        cards = [work / "cards" / f"{n}.lora.arrow" for n in names]
        node = start_node(
            children,
            work / "node",
            cards,
            names,
            threads=a.threads,
            max_batch=a.max_batch,
            max_wait_ms=a.max_wait_ms,
            timeout=a.start_timeout,
        )
    for key, (proc, port_file, log) in pending.items():
        got = _wait_server(proc, port_file, log, a.start_timeout)
        if isinstance(got, str):
            systems[key].missing = got
        else:
            systems[key].driver = Driver(f"http://127.0.0.1:{got}", a.concurrency, timeout=a.request_timeout)
            systems[key].models = list(names)
    if "d" in systems:
        d = systems["d"]
        try:
            assert d.proc is not None
            _st_call(d.proc, None, a.start_timeout)
        except (TimeoutError, RuntimeError, ValueError) as e:
            d.missing = f"{e}: {log_tail(work / 'st.log')}"
    for key in ("ours", "a", "exchange"):
        if key not in systems:
            continue
        if isinstance(node, str):
            systems[key].missing = node
        elif isinstance(node, Node):
            systems[key].driver = Driver(node.api_url, a.concurrency, timeout=a.request_timeout)
            systems[key].flight_uri = node.flight_uri
            systems[key].models = [node.base_id] if key == "a" else list(node.models)
    return systems


# --------------------------------------------------------------------------- measuring


def check_agreement(systems: dict[str, System]) -> list[str]:
    """Embeddings of the same texts from each HTTP server, against (b)'s: the same model should
    give the same vectors (up to float noise), and each adapter should move them off the base."""
    texts = make_texts(4, seed=7)
    ref = systems.get("b")
    lines = []
    if ref is None or not ref.ok or ref.driver is None:
        return ["agreement: (b) not running; vectors not cross-checked"]
    from bench._serving_common import BASE_ID

    def vecs(s: System, model: str) -> list[list[float]]:
        assert s.driver is not None
        return s.driver.embed(model, texts)

    def diff(x: list[list[float]], y: list[list[float]]) -> float:
        return max(abs(p - q) for u, v in zip(x, y, strict=True) for p, q in zip(u, v, strict=True))

    try:
        base = vecs(ref, BASE_ID)
        moved = min(diff(vecs(ref, m), base) for m in ref.models)
    except Exception as e:  # a refused request or a malformed answer: reported, never fatal
        return [f"agreement: (b) could not be asked for vectors: {type(e).__name__}: {e}"]
    lines.append(f"agreement: each adapter moves (b)'s vectors off the base by ≥ {moved:.3g} (max abs)")
    for key in ("ours", "c"):
        s = systems.get(key)
        if s is None or not s.ok or s.driver is None:
            continue
        try:
            worst = max(diff(vecs(s, m), vecs(ref, m)) for m in s.models)
            node_base = (
                systems["a"].models[0] if key == "ours" and "a" in systems and systems["a"].ok else BASE_ID
            )
            worst_base = diff(vecs(s, node_base), base)
        except Exception as e:  # as above
            lines.append(f"agreement: {key} could not be compared: {type(e).__name__}: {e}")
            continue
        flag = "" if max(worst, worst_base) < 1e-3 else "  <-- DIFFERENT MODELS?"
        lines.append(
            f"agreement: {key} vs (b), max abs difference: adapters {worst:.2e}, base {worst_base:.2e}{flag}"
        )
    return lines


def measure(s: System, seed: int, requests: int, concurrency: int) -> Result:
    """One run of `requests` one-text requests (texts `make_texts(requests, seed)`)."""
    if s.key == "d":
        assert s.proc is not None
        # (d) has no request stream: the same texts in batches of `concurrency`
        out = _st_call(s.proc, {"n": requests, "batch": concurrency, "seed": seed}, 600)
        return Result(requests, float(out["wall"]), list(out["lat"]), items=requests)
    assert s.driver is not None
    return s.driver.run(s.models, make_texts(requests, seed=seed), requests)


def run_rounds(systems: dict[str, System], a: argparse.Namespace) -> None:
    order = [k for k in ("ours", "a", "b", "c", "d") if k in systems and systems[k].ok]
    for k in order:
        try:
            r = measure(systems[k], 12345, a.warmup, a.concurrency)
        except Exception as e:  # (d)'s worker died or hung: that row only
            systems[k].missing = f"warm-up failed: {type(e).__name__}: {e}"
            continue
        if r.errors and not r.requests:
            systems[k].missing = f"every warm-up request failed: {r.first_error}"
    order = [k for k in order if systems[k].ok]
    for i in range(a.runs):
        for k in order:
            if not systems[k].ok:
                continue
            try:
                r = measure(systems[k], i, a.requests, a.concurrency)
            except Exception as e:  # as above
                systems[k].missing = f"run {i + 1} failed: {type(e).__name__}: {e}"
                continue
            systems[k].results.append(r)
            note = f", {r.errors} errors (first: {r.first_error})" if r.errors else ""
            print(
                f"  run {i + 1}/{a.runs} {k:<4} {r.rps:8.1f} req/s  p50 {r.pct(0.5) * 1e3:7.2f} ms  "
                f"p99 {r.pct(0.99) * 1e3:7.2f} ms{note}",
                flush=True,
            )


def rps(s: System | None) -> float:
    if s is None or not s.ok or not s.results:
        return math.nan
    return median([r.rps for r in s.results])


def cell(text: str, limit: int = 300) -> str:
    """`text` made safe for one Markdown table cell."""
    flat = " ".join(text.replace("|", ";").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def table(systems: dict[str, System]) -> list[str]:
    ours, b = rps(systems.get("ours")), rps(systems.get("b"))
    out = [
        "| system | req/s (median) | p50 ms | p99 ms | ours ÷ this | target | this ÷ (b) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in ("ours", "a", "b", "c", "d"):
        s = systems.get(k)
        if s is None:
            continue
        if not s.ok:
            out.append(f"| {LABELS[k]} | not available: {cell(s.missing)} | | | | | |")
            continue
        v = rps(s)
        if not v > 0:
            first = next((r.first_error for r in s.results if r.first_error), "")
            out.append(f"| {LABELS[k]} | no request answered: {cell(first)} | | | | | |")
            continue
        p50 = median([r.pct(0.5) for r in s.results]) * 1e3
        p99 = median([r.pct(0.99) for r in s.results]) * 1e3
        errors = sum(r.errors for r in s.results)
        ratio = "—" if k == "ours" or math.isnan(ours) else f"{ours / v:.2f}×"
        target = TARGETS.get(k)
        if target is None:
            tgt = "upper bound (no HTTP, base only)" if k == "d" else ""
        elif math.isnan(ours):
            tgt = f"≥ {target}×"
        else:
            tgt = f"≥ {target}× {'met' if ours / v >= target else 'MISSED'}"
        vb = "" if math.isnan(b) else f"{v / b:.2f}×"
        err = f" ({errors} errors)" if errors else ""
        out.append(f"| {LABELS[k]} | {v:.1f}{err} | {p50:.2f} | {p99:.2f} | {ratio} | {tgt} | {vb} |")
    return out


def run_exchange(s: System, a: argparse.Namespace) -> list[str]:
    """do_exchange vs the HTTP API for the same texts (texts/s, medians over alternating runs)."""
    if not s.ok:
        return [f"| do_exchange vs HTTP, {a.exchange_texts} texts | not available: {cell(s.missing)} | | |"]
    node_api, uri = s.driver, s.flight_uri
    assert node_api is not None
    texts = make_texts(a.exchange_texts, seed=99)
    per_row, note = True, "per-row adapter column"
    try:
        exchange(uri, s.models, texts[: a.exchange_batch], batch=a.exchange_batch, per_row=True)
    except Exception as e:
        try:
            exchange(uri, s.models, texts[: a.exchange_batch], batch=a.exchange_batch, per_row=False)
        except Exception as e2:
            why = f"{type(e2).__name__}: {str(e2).splitlines()[0] if str(e2) else ''}"
            return [f"| do_exchange vs HTTP, {a.exchange_texts} texts | not available: {cell(why)} | | |"]
        per_row, note = (
            False,
            f"one adapter per stream (the adapter column was refused: {str(e).splitlines()[0]})",
        )
    per_req = a.exchange_per_request
    n_req = math.ceil(len(texts) / per_req)
    node_api.run(s.models, texts[: per_req * 4], 4, per_request=per_req)  # warm the HTTP path too
    ex, ht = [], []
    errors = 0
    for i in range(a.exchange_runs):
        try:
            dt, rows, width = exchange(uri, s.models, texts, batch=a.exchange_batch, per_row=per_row)
        except Exception as e:
            why = f"run {i + 1} failed: {type(e).__name__}: {e}"
            return [f"| do_exchange vs HTTP, {a.exchange_texts} texts | {cell(why)} | | |"]
        ex.append(rows / dt)
        r = node_api.run(s.models, texts, n_req, per_request=per_req)
        errors += r.errors
        ht.append(r.items_per_s)
        print(
            f"  exchange run {i + 1}: do_exchange {ex[-1]:.0f} texts/s (dim {width}), HTTP {ht[-1]:.0f} texts/s"
        )
    xr, h = median(ex), median(ht)
    if not h > 0:
        return [
            f"| do_exchange vs HTTP, {a.exchange_texts} texts | HTTP answered nothing ({errors} errors) | | |"
        ]
    err = f", {errors} HTTP errors" if errors else ""
    return [
        f"| {a.exchange_texts} texts through | texts/s (median) | do_exchange ÷ HTTP | notes |",
        "| --- | --- | --- | --- |",
        f"| do_exchange, batches of {a.exchange_batch} | {xr:.0f} | {xr / h:.2f}× | {note} |",
        f"| HTTP API, concurrency {a.concurrency}, {per_req} texts/request | {h:.0f}{err} | | |",
    ]


# --------------------------------------------------------------------------- entry point


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench serving", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per run (default 1000)")
    ap.add_argument("--runs", type=int, default=5, help="runs per system, alternating (default 5)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads per server (default: half the cores; the load generator needs the rest)",
    )
    ap.add_argument(
        "--warmup", type=int, default=0, help="warm-up requests per system (default 4× concurrency)"
    )
    ap.add_argument("--max-batch", type=int, default=32, help="rows per forward, ours and (c)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="batching window, ours and (c)")
    ap.add_argument("--exchange-texts", type=int, default=10_000)
    ap.add_argument("--exchange-batch", type=int, default=1000)
    ap.add_argument("--exchange-per-request", type=int, default=64)
    ap.add_argument("--exchange-runs", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=240.0, help="seconds to wait for each server")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--quick", action="store_true", help="a small run for checking (under a minute)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    a = ap.parse_args(argv)
    if a.quick:
        a.requests, a.runs, a.exchange_runs = min(a.requests, 96), min(a.runs, 3), 1
        a.exchange_texts, a.exchange_batch = min(a.exchange_texts, 1000), min(a.exchange_batch, 250)
    a.warmup = a.warmup or (2 if a.quick else 4) * a.concurrency
    wanted = {x.strip() for x in a.only.split(",") if x.strip()} or set(SYSTEMS)
    bad = wanted - set(SYSTEMS)
    if bad:
        ap.error(f"--only: unknown {sorted(bad)}; choose from {', '.join(SYSTEMS)}")
    for name in (
        "requests",
        "runs",
        "concurrency",
        "threads",
        "max_batch",
        "exchange_texts",
        "exchange_batch",
    ):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    a.wanted = wanted
    return a


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    children = Children()
    systems: dict[str, System] = {}
    t0 = time.monotonic()
    try:
        print(f"machine: {machine('at start')}", flush=True)
        print(f"versions: {versions()}", flush=True)
        print(
            f"settings: concurrency {a.concurrency}, {a.requests} requests × {a.runs} runs per system after "
            f"{a.warmup} warm-up, torch threads {a.threads}, max_batch {a.max_batch}, "
            f"max_wait_ms {a.max_wait_ms}, 4 adapters r=8 on every encoder Linear",
            flush=True,
        )
        _prepare(work, children, a.threads)
        systems = start_all(a.wanted, work, children, a)
        node_log = work / "node" / "node.log"
        for line in check_agreement(systems):
            print(line, flush=True)
        run_rounds(systems, a)
        print()
        for line in table(systems):
            print(line)
        if "exchange" in systems:
            print()
            for line in run_exchange(systems["exchange"], a):
                print(line)
        print(
            f"\nmachine: {machine('at the end')}\nversions: {versions()}\nwall time {time.monotonic() - t0:.0f} s"
        )
        if a.keep:
            print(f"work folder kept: {work} (node log {node_log})")
    except KeyboardInterrupt:
        print("interrupted; stopping every server", file=sys.stderr)
        return 130
    finally:
        for s in systems.values():
            if s.driver is not None:
                s.driver.close()
        children.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


__all__ = ["SYSTEMS", "System", "main", "measure", "parse", "table"]

if __name__ == "__main__":
    sys.exit(main())
