"""Fuzz the card reader at scale: N mutated cards through open -> touch -> verify, in worker processes.

    python -m bench fuzz [--cases 100000] [--workers 2] [--chunk 10000] [--seed 0]

Each chunk runs `tests.engine.fuzz_driver` in its own subprocess (a crash fails that chunk and
is reported with its case number); chunks use seeds seed, seed+1, ... so a failure is
reproducible with `python -m tests.engine.fuzz_driver --cases CHUNK --seed S`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_chunk(cases: int, seed: int, workdir: Path, timeout: float) -> dict:
    progress = workdir / f"progress-{seed}"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.engine.fuzz_driver",
                "--cases",
                str(cases),
                "--seed",
                str(seed),
                "--progress",
                str(progress),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"seed": seed, "crashed": f"chunk ran past {timeout:.0f} s", "cases": 0}
    if proc.returncode in (0, 1) and proc.stdout.strip():
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        doc["seed"] = seed
        return doc
    case = struct.unpack("<q", progress.read_bytes()[:8])[0] if progress.exists() else -1
    return {
        "seed": seed,
        "crashed": f"exit {proc.returncode} at case {case}: {proc.stderr[-2000:]}",
        "cases": 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)

    chunks = []
    left, seed = args.cases, args.seed
    while left > 0:
        n = min(args.chunk, left)
        chunks.append((n, seed))
        left -= n
        seed += 1
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lf-fuzz-") as d, ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda c: run_chunk(c[0], c[1], Path(d), args.chunk_timeout), chunks))
    wall = time.monotonic() - t0

    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    verified: Counter[str] = Counter()
    failures, crashes = [], []
    for r in results:
        outcomes.update(r.get("outcomes", {}))
        kinds.update(r.get("kinds", {}))
        verified.update(r.get("verified", {}))
        failures += [{**f, "seed": r["seed"]} for f in r.get("failures", [])]
        if "crashed" in r:
            crashes.append(r)
    total = sum(r.get("cases", 0) for r in results)
    print(f"# fuzz cards: {total} cases in {len(chunks)} chunks, {args.workers} workers, {wall:.1f} s wall")
    print(f"# python {platform.python_version()}, nproc {os.cpu_count()}, seeds {args.seed}..{seed - 1}")
    print()
    print("| outcome | cases |")
    print("| --- | --- |")
    for k, v in sorted(outcomes.items()):
        print(f"| {k} | {v} |")
    print(f"| failures (wrong exception, hang, or defect not named) | {len(failures)} |")
    print(f"| crashed chunks | {len(crashes)} |")
    print()
    random_kinds = {k: v for k, v in kinds.items() if not k.startswith("targeted:")}
    targeted = {k: v for k, v in kinds.items() if k.startswith("targeted:")}
    print("mutations (cases / of which verified intact):")
    for k, v in sorted(random_kinds.items()):
        print(f"  {k:<14} {v:>7} / {verified.get(k, 0)}")
    print(f"targeted defects: {len(targeted)} kinds, {sum(targeted.values())} cases")
    for f in failures[:20]:
        print(f"FAIL seed {f['seed']} case {f['case']} {f['kind']}: {f['why'][:300]}")
    for c in crashes:
        print(f"CRASH seed {c['seed']}: {c['crashed'][:1000]}")
    return 0 if not failures and not crashes and total == args.cases else 1


if __name__ == "__main__":
    raise SystemExit(main())
