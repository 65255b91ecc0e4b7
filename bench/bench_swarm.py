"""The piece swarm on shaped links: publish a 33.6 MB card on one of N hosts -> stored and verified on all.

    .venv/bin/python -m bench swarm [--ns 4,8,16] [--repeats 3] [--rate 200mbit]

Runs as root inside its own `unshare -n -m` (it re-executes itself there): N hosts in network
namespaces on one bridge, every host's uplink shaped with `tc tbf rate RATE burst 256kb
latency 50ms` (links, not this machine's cores, are meant to be the limit) and
`net.ipv4.tcp_notsent_lowat` set as deploy/ sets it (`--notsent-lowat 0`: the kernel's
default, no limit; docs/operations.md, "A kernel setting for fast spreads"), one engine-less
`loraflight node run` per host with every other host as a static peer, stores on tmpfs (one
disk must not stand in for N). Per N, after one warm-up round, `--repeats` rounds each publish
a new version of a LLaMA-7B-shape rank-16 fp16 card (8 pieces of 4 MiB) on h1 and time it
until every host lists it stored (verified). Reported, as medians:

* link-time: one plain whole-card `DoGet` of the card from h1 over its shaped uplink, in the
  same run (the time one host needs to send the card once);
* publish -> on all, in seconds and in link-times;
* bytes h1 sent meanwhile (its eth0 `tx_bytes`), in card sizes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._machine import run_in_lab
from loraflight.federation.swarm.settings import SEND_QUEUE_BYTES

FLEET = "swarmbench"


def card(version: int, key: Any) -> Any:
    """33.6 MB: q, k, v, o of 32 layers at rank 16 in fp16 (4096 wide), signed."""
    from loraflight.engine.card import LoRACard, ModuleLoRA

    rng = np.random.default_rng(version)
    mods = []
    for layer in range(32):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a = (rng.standard_normal((16, 4096), dtype=np.float32) * 0.01).astype(np.float16)
            b = (rng.standard_normal((4096, 16), dtype=np.float32) * 0.01).astype(np.float16)
            mods.append(ModuleLoRA(f"model.layers.{layer}.self_attn.{p}", 16, 32.0, a, b))
    return LoRACard.build(mods, name="swarm-big", version=version, dtype="float16").sign(key)


def stored_on(lab: Any, hosts: list[int], digest: str, timeout: float) -> dict[int, float]:
    """Seconds until each host lists `digest` (one watching thread per host).

    Each thread watches for the card's file in the host's store (a `stat` every 5 ms costs the
    hosts nothing; the store renames the file into cards/ only after it verified it) and then
    asks the host's listing, again every 5 ms until it lists the card: asking the listings
    every 20 ms from the start was 400 calls a second into eight busy nodes, CPU the swarm
    itself then lacked on this machine.
    """
    from loraflight.federation.client import Client

    t0 = time.perf_counter()
    done: dict[int, float] = {}

    def watch(i: int) -> None:
        deadline = time.monotonic() + timeout
        path = lab.store_dir(i) / "cards" / f"{digest}.lora.arrow"
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        with Client(lab.uri(i), timeout=5.0, retries=0) as c:
            while time.monotonic() < deadline:
                try:
                    if c.list(digest=digest):
                        done[i] = time.perf_counter() - t0
                        return
                except Exception:  # a host still starting or busy: ask again
                    pass
                time.sleep(0.005)

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if len(done) != len(hosts):
        raise SystemExit(f"not stored on {sorted(set(hosts) - set(done))} after {timeout:.0f} s")
    return done


def link_time(lab: Any, digest: str) -> float:
    """One plain whole-card DoGet from h1 (its shaped uplink) to the lab, transport only."""
    from loraflight.federation.client import Client

    with Client(lab.uri(1), timeout=120.0) as c:
        t0 = time.perf_counter()
        c.stream(digest).read_all()
        return time.perf_counter() - t0


def origin_counts(lab: Any) -> dict[str, int]:
    """h1's swarm counters (node-info): pieces served, referred, and forced (sent again on a
    `last` ticket), to say where an origin's bytes beyond one card went."""
    from loraflight.federation.client import Client

    with Client(lab.uri(1), timeout=30.0) as c:
        sw = c.node_info().get("swarm", {})
    return {k: int(sw.get(k, 0)) for k in ("served_pieces", "referred", "forced")}


def run_n(lab: Any, n: int, repeats: int, key: Any, pub: str, version0: int) -> dict[str, Any]:
    from loraflight.testing import wait_for

    hosts = list(range(1, n + 1))
    for i in hosts:
        peers = [a for j in hosts if j != i for a in ("--peer", lab.uri(j))]
        lab.start_node(
            i, FLEET, "--trust-key", pub, "--no-discovery", *peers, "--intervals-poll", "5", engine=""
        )
    for i in hosts:
        lab.wait_up(i, 300)
    wait_for(lambda: all(len(lab.live_peers(i)) >= n - 1 for i in hosts), 180, f"{n} hosts to see each other")
    rounds = []
    for r in range(repeats + 1):
        c = card(version0 + r, key)
        size = len(c.to_bytes())
        tx0, counts0 = lab.tx_bytes(1), origin_counts(lab)
        t0 = time.perf_counter()
        lab.publish(1, c)
        t1 = time.perf_counter()
        at = stored_on(lab, hosts, c.digest, 300.0)  # seconds from the publish answer
        spread = max(at.values()) + (t1 - t0)  # from the publish call on
        origin = at[1] + (t1 - t0)  # publish -> stored on h1 (not the swarm's part)
        sent = (lab.tx_bytes(1) - tx0) / size
        counts = {k: v - counts0[k] for k, v in origin_counts(lab).items()}
        lt = link_time(lab, c.digest)
        load = os.getloadavg()[0]  # the machine's cores are shared by every host (and more)
        if r:  # the first round warms up
            rounds.append(
                {"spread": spread, "link": lt, "origin": sent, "size": size, "h1": origin, "load": load}
            )
        print(
            f"  N={n} round {r}: {spread:.2f} s (h1 stored after {origin:.2f} s), link-time {lt:.2f} s, "
            f"h1 sent {sent:.2f} cards (pieces served {counts['served_pieces']}, referred "
            f"{counts['referred']}, of the served forced by 'last' {counts['forced']}), load average {load:.1f}",
            flush=True,
        )
    wipe(lab, hosts)
    med = {k: statistics.median(x[k] for x in rounds) for k in ("spread", "link", "origin", "h1", "load")}
    med["lt"] = statistics.median(x["spread"] / x["link"] for x in rounds)
    return {"n": n, "size": rounds[0]["size"], **med}


def wipe(lab: Any, hosts: list[int]) -> None:
    """Stop the nodes and empty their stores, so the next N starts from empty stores."""
    import shutil

    for i in list(lab.procs):
        lab.stop_node(i)
    for i in hosts:
        shutil.rmtree(lab.store_dir(i), ignore_errors=True)


def _inside(args: argparse.Namespace) -> int:
    from loraflight.testing import Lab, new_signer, sh

    ns = [int(x) for x in args.ns.split(",") if x]
    key, pub = new_signer()
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="lf-bench-swarm-") as d:
        lab = Lab(Path(args.workdir or d), tmpfs_stores=True)
        try:
            lab.setup()
            for i in range(1, max(ns) + 1):
                lab.add_host(i, rate=args.rate)
                if args.notsent_lowat:  # per namespace: this machine's own setting is untouched
                    sh(
                        "ip",
                        "netns",
                        "exec",
                        f"h{i}",
                        "sysctl",
                        "-q",
                        "-w",
                        f"net.ipv4.tcp_notsent_lowat={args.notsent_lowat}",
                    )
            version = 1
            for n in ns:
                try:
                    results.append(run_n(lab, n, args.repeats, key, pub, version))
                except (SystemExit, AssertionError) as e:
                    skipped.append(f"N={n}: {e}")
                    wipe(lab, list(range(1, n + 1)))
                version += args.repeats + 1
        except BaseException:
            lab.dump()
            raise
        finally:
            lab.teardown()
    print(
        f"\nswarm: {args.rate} tbf uplinks, stores on tmpfs, engine-less nodes; medians of {args.repeats} "
        f"rounds after a warm-up; nproc {os.cpu_count()} shared by every host; tcp_notsent_lowat "
        f"{args.notsent_lowat or 'kernel default (no limit)'}"
    )
    if results:
        print(
            f"card {results[0]['size'] / 1e6:.1f} MB (8 pieces); link-time = one whole-card DoGet over one link"
        )
        print(
            "| N | publish -> on all | of which publish -> on h1 | link-time | on all, in link-times "
            "| h1 sent, card sizes | vs first N | load average (1 min) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(
                f"| {r['n']} | {r['spread']:.2f} s | {r['h1']:.2f} s | {r['link']:.2f} s | {r['lt']:.2f} "
                f"| {r['origin']:.2f} | {r['spread'] / results[0]['spread']:.2f}x | {r['load']:.1f} |"
            )
    for s in skipped:
        print(f"skipped {s}")
    print("targets: <= 2.0 link-times at N=8, <= 2.5 at N=16; h1 sends <= 1.5 card sizes")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench swarm", description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="4,8,16", help="host counts, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="rounds per N after one warm-up")
    p.add_argument("--rate", default="200mbit", help="every host's uplink (tc tbf rate)")
    p.add_argument(
        "--notsent-lowat",
        type=int,
        default=SEND_QUEUE_BYTES,
        help="net.ipv4.tcp_notsent_lowat (bytes) in every host namespace, as deploy/ sets it; "
        "0 keeps the kernel's default (no limit)",
    )
    p.add_argument("--workdir", default="", help="keep the nodes' logs and status files here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_in_lab("bench.bench_swarm", argv, lambda: _inside(args))


if __name__ == "__main__":
    sys.exit(main())
