"""Membership at fleet scale on N netns hosts: idle CPU per node, a killed node leaving every table, a card reaching all.

    .venv/bin/python -m bench membership [--ns 4,8,16] [--window 15] [--repeats 3] [--no-baseline]

Runs as root inside its own `unshare -n -m` (it re-executes itself there): N hosts in network
namespaces on one bridge, one `loraflight node run` per host without an engine (no base model,
so no torch), mDNS over the veths, the lab's intervals (health 0.5 s) and a SWIM period of 0.5 s.

* idle CPU per node: utime + stime from /proc/PID/stat over `--window` seconds once the fleet has
  met and settled, in ms of CPU per minute; the median node, median over repeats. With
  `--no-baseline` off (the default), the same is measured with `membership.enabled = false`
  (every node health-checks every peer, as before) in the same run.
* leave: SIGKILL one node, time until no other node holds it live (status files); restarted and
  met again between repeats (every SWIM table holding it alive before the next kill). At N = 4
  and the largest N.
* card: a small card published on h1, time until every host stores it.

Prints medians, the ratios N_max / N_min, and the load average before and after (the machine
is shared: the figures are only as quiet as it was).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._machine import cpu_model, load_average, run_in_lab

SWIM = ("--membership-probe-interval", "0.5")
TICKS = os.sysconf("SC_CLK_TCK")


def _machine() -> str:
    import pyarrow
    import zeroconf

    cpu = cpu_model()
    return (
        f"python {platform.python_version()}, pyarrow {pyarrow.__version__}, zeroconf {zeroconf.__version__}; "
        f"nproc {os.cpu_count()}; CPU {cpu}"
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _start(lab: Any, hosts: list[int], pub: str, swim: bool) -> dict[int, str]:

    extra = SWIM if swim else ("--no-membership-enabled",)
    for i in hosts:
        lab.start_node(i, "bench", "--trust-key", pub, *extra, engine="")
    ids = {i: lab.wait_up(i, timeout=300)["node_id"] for i in hosts}
    _met(lab, hosts, ids)
    return ids


def _met(lab: Any, hosts: list[int], ids: dict[int, str]) -> None:
    from loraflight.testing import wait_for

    for i in hosts:
        others = {ids[j] for j in hosts if j != i}
        wait_for(lambda i=i, o=others: lab.live_peers(i) >= o, 180, f"h{i} to see its {len(others)} peers")


def _swim_met(lab: Any, hosts: list[int], ids: dict[int, str]) -> None:
    """Every node's SWIM table holds every other node alive (after a restart the peer table
    can hold a node live a period before SWIM has heard its new incarnation; a kill inside that
    window is caught by the peer loop's health calls, which is not what this row measures)."""
    from loraflight.testing import wait_for

    def alive(i: int) -> bool:
        members = ((lab.status(i) or {}).get("membership") or {}).get("members", [])
        held = {m["node_id"] for m in members if m.get("state") == "alive"}
        return held >= {ids[j] for j in hosts if j != i}

    for i in hosts:
        wait_for(lambda i=i: alive(i), 180, f"h{i}'s SWIM table to hold every peer alive")


def _stop_all(lab: Any, hosts: list[int]) -> None:
    import shutil

    for i in list(lab.procs):
        lab.stop_node(i, signal.SIGTERM)
    for i in hosts:
        shutil.rmtree(lab.workdir / f"h{i}", ignore_errors=True)


def idle_cpu(lab: Any, hosts: list[int], window: float) -> float:
    """Median node's CPU over `window` seconds, ms per minute."""
    time.sleep(3.0)  # settle: the first syncs and status writes are done
    pids = {i: lab.procs[i].pid for i in hosts}
    c0 = {i: cpu_seconds(p) for i, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(window)
    dt = time.monotonic() - t0
    per = [(cpu_seconds(p) - c0[i]) / dt * 60_000 for i, p in pids.items()]
    return statistics.median(per)


def leave_time(lab: Any, hosts: list[int], ids: dict[int, str], pub: str, swim: bool) -> float:
    from loraflight.testing import wait_for

    victim = hosts[1]
    rest = [i for i in hosts if i != victim]
    if swim:
        _swim_met(lab, hosts, ids)
    lab.stop_node(victim, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: all(ids[victim] not in lab.live_peers(i) for i in rest), 120, "the killed node to leave")
    took = time.monotonic() - t0
    lab.start_node(
        victim, "bench", "--trust-key", pub, *(SWIM if swim else ("--no-membership-enabled",)), engine=""
    )
    lab.wait_up(victim, timeout=300)
    _met(lab, hosts, ids)
    if swim:
        _swim_met(lab, hosts, ids)
    return took


def card_time(lab: Any, hosts: list[int], key: Any, version: int) -> float:
    from loraflight.testing import tiny_card, wait_for

    card = tiny_card("bench-skill", version, key=key, seed=version)
    ref = f"bench-skill@{version}"
    t0 = time.monotonic()
    lab.publish(hosts[0], card)
    wait_for(lambda: all(lab.has_card(i, ref) for i in hosts), 120, f"{ref} on every host")
    return time.monotonic() - t0


def _inside(args: argparse.Namespace) -> int:
    from loraflight.engine import keys
    from loraflight.testing import Lab

    ns = [int(x) for x in args.ns.split(",")]
    key = keys.generate()
    pub = keys.public_key_b64(key.public_key())
    load_before = load_average()
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    version = 0
    with tempfile.TemporaryDirectory(prefix="lf-bench-swim-") as d:
        lab = Lab(Path(d))
        lab.setup()
        for i in range(1, max(ns) + 1):
            lab.add_host(i)
        modes = [("swim", True)] + ([] if args.no_baseline else [("all-peers", False)])
        try:
            for mode, swim in modes:
                for n in ns:
                    hosts = list(range(1, n + 1))
                    ids = _start(lab, hosts, pub, swim)
                    r: dict[str, Any] = {"cpu": [], "leave": [], "card": []}
                    for _ in range(args.repeats):
                        r["cpu"].append(idle_cpu(lab, hosts, args.window))
                    if swim:
                        for _ in range(args.repeats):
                            version += 1
                            r["card"].append(card_time(lab, hosts, key, version))
                        if n in (min(ns), max(ns)):
                            for _ in range(args.repeats):
                                r["leave"].append(leave_time(lab, hosts, ids, pub, swim))
                                print(
                                    f"  {mode} N={n}: leave {r['leave'][-1]:.2f} s",
                                    file=sys.stderr,
                                    flush=True,
                                )
                    rows[(mode, n)] = {k: statistics.median(v) if v else None for k, v in r.items()}
                    print(
                        f"  {mode} N={n}: {rows[(mode, n)]} (load {load_average()})",
                        file=sys.stderr,
                        flush=True,
                    )
                    _stop_all(lab, hosts)
        except BaseException:
            lab.dump()
            raise
        finally:
            lab.teardown()
    lo, hi = min(ns), max(ns)
    print(f"\nmembership over N network-namespace hosts (mDNS on veths, no engine), medians; {_machine()}")
    print(
        f"load average before {load_before}, after {load_average()}; window {args.window:.0f} s, {args.repeats} repeats"
    )
    print(
        "\n| N | idle CPU per node, SWIM | idle CPU, every node checks every peer | card on all | killed node leaves all |"
    )
    print("| --- | --- | --- | --- | --- |")
    for n in ns:
        s = rows[("swim", n)]
        b = rows.get(("all-peers", n))
        base = f"{b['cpu']:.0f} ms/min" if b else "-"
        leave = f"{s['leave'] * 1000:.0f} ms" if s["leave"] is not None else "-"
        print(f"| {n} | {s['cpu']:.0f} ms/min | {base} | {s['card'] * 1000:.0f} ms | {leave} |")
    s_lo, s_hi = rows[("swim", lo)], rows[("swim", hi)]
    print(f"\nidle CPU N={hi}/N={lo}: {s_hi['cpu'] / s_lo['cpu']:.2f}x (target <= 1.5x)", end="")
    if ("all-peers", hi) in rows:
        b_lo, b_hi = rows[("all-peers", lo)], rows[("all-peers", hi)]
        print(f"; every-peer checks: {b_hi['cpu'] / b_lo['cpu']:.2f}x", end="")
    print()
    if s_lo["leave"] and s_hi["leave"]:
        print(f"leave time N={hi}/N={lo}: {s_hi['leave'] / s_lo['leave']:.2f}x (target <= 1.5x)")
    print(f"card on all N={hi}/N={lo}: {s_hi['card'] / s_lo['card']:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench membership", description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="4,8,16", help="host counts, comma-separated")
    p.add_argument("--window", type=float, default=15.0, help="seconds of idle CPU measured per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measure")
    p.add_argument("--no-baseline", action="store_true", help="skip the membership.enabled = false runs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_in_lab("bench.bench_membership", argv, lambda: _inside(args))


if __name__ == "__main__":
    sys.exit(main())
