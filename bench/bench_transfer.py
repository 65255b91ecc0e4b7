"""Transfer benchmark: loraflight over Flight vs raw pyarrow do_get, http.server + urllib, iperf3.

Run: .venv/bin/python bench/bench_transfer.py [--repeats 5] [--mib 64] [--small 200]
Catch-up rows only (issue 17): .venv/bin/python -m bench transfer --catchup [--small 200 --many 2000]

Every server runs in its own spawned process and all are up at once; the client side runs
here, alternating competitors (A B A B ...) so drift hits both alike. Each figure is the
median of --repeats runs after one warm-up. Ratios compare tools measured in this run.
Clean-up between runs (dropping the received file, removing the card from the store,
deleting a run's directory) happens after the clock stops, for every competitor alike.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import json
import multiprocessing as mp
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._iperf import iperf3_rate
from bench._machine import cpu_model

CTX = mp.get_context("spawn")


# --------------------------------------------------------------------------- servers (children)


def _raw_flight_server(path_dir: str, tls: tuple[bytes, bytes] | None, q) -> None:
    import pyarrow as pa
    import pyarrow.flight as fl

    class Raw(fl.FlightServerBase):
        def do_get(self, context, ticket):
            p = Path(path_dir) / (ticket.ticket.decode() + ".lora.arrow")
            table = pa.ipc.open_file(pa.memory_map(str(p))).read_all()
            return fl.RecordBatchStream(table)

    kw = {"tls_certificates": [tls]} if tls else {}
    s = Raw(f"grpc{'+tls' if tls else ''}://127.0.0.1:0", **kw)
    q.put(s.port)
    s.serve()


def _card_server(root: str, tls: tuple[bytes, bytes] | None, q) -> None:
    from loraflight.federation import CardServer, ServerTLS, Store
    from loraflight.federation.server import Limits

    tls_cfg = ServerTLS(tls[0], tls[1]) if tls else None
    s = CardServer(
        Store(root), listen="127.0.0.1:0", tls=tls_cfg, node_id="bench", limits=Limits(max_concurrent_gets=8)
    )
    q.put(s.port)
    s.serve()


def _http_server(directory: str, tls: tuple[str, str] | None, q) -> None:
    handler = partial(_QuietHandler, directory=directory)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls[0], tls[1])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    q.put(srv.server_address[1])
    srv.serve_forever()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass


def start(target, *args) -> tuple[mp.Process, int]:
    q = CTX.Queue()
    p = CTX.Process(target=target, args=(*args, q), daemon=True)
    p.start()
    return p, q.get(timeout=60)


# --------------------------------------------------------------------------- client side


Cleanup = Callable[[], None] | None


def timed(fn: Callable[[], Cleanup]) -> float:
    """Seconds `fn` took; a clean-up it returns runs after the clock stops."""
    t = time.perf_counter()
    cleanup = fn()
    dt = time.perf_counter() - t
    if cleanup is not None:
        cleanup()
    return dt


def raw_do_get(client, digest: str) -> Cleanup:
    """Bare raw `do_get`: every batch read (read_chunk until the end; faster here than
    read_all, which also assembles a table), nothing else."""
    import pyarrow.flight as fl

    r = client.do_get(fl.Ticket(digest.encode()))
    while True:
        try:
            r.read_chunk()
        except StopIteration:
            break
    return None


def raw_do_get_hashed(
    client, digest: str, hasher: Callable[[], Any], write_to: Path | None = None
) -> Cleanup:
    """The floor of a transfer phase: raw `do_get`, and every buffer of every batch hashed as
    it arrives (one hasher over the stream, in the receiving thread); with `write_to`, each
    buffer is also written to a temp file there (unbuffered, not fsynced; deleted after)."""
    import pyarrow.flight as fl

    r = client.do_get(fl.Ticket(digest.encode()))
    h = hasher()
    f = open(write_to / f".floor-{time.perf_counter_ns()}", "wb", buffering=0) if write_to else None  # noqa: SIM115
    while True:
        try:
            chunk = r.read_chunk()
        except StopIteration:
            break
        for col in chunk.data.columns:
            for b in col.buffers():
                if b is not None:
                    h.update(b)
                    if f is not None:
                        f.write(b)
    h.digest()
    if f is not None:
        f.close()
        return partial(os.unlink, f.name)
    return None


def ours_receive(client, entry) -> Cleanup:
    """Our client's receive loop alone (read_chunk until the end), nothing else."""
    r = client.stream(entry.digest)
    while True:
        try:
            r.read_chunk()
        except StopIteration:
            break
    return None


def ours_stage(client, entry, store) -> Cleanup:
    """The transfer phase of a real fetch: receive while workers hash, check values and
    write the temp file; stops before fsync/verify/rename/index (the temp file is dropped
    after the clock stops)."""
    r = client.stream(entry.digest)
    st = store.stage(r.schema, rows=entry.rows, max_bytes=entry.size, expect=entry)
    try:
        while True:
            try:
                chunk = r.read_chunk()
            except StopIteration:
                break
            st.write_batch(chunk.data)
        assert st.received_digest() == entry.digest
    except BaseException:
        st.abort()
        raise
    return st.abort


def ours_fetch(client, entry, store) -> Cleanup:
    """End to end: hash while receiving, write, fsync, open + verify, rename, index."""
    client.fetch_entry(entry, store=store)

    def cleanup() -> None:
        store.remove(entry.digest)

    return cleanup


def http_fetch(
    url: str, dest_dir: Path, expect_sha: str, ctx=None, hasher: Callable[[], Any] = hashlib.sha256
) -> Cleanup:
    """The competitor end to end: GET, hash while receiving (sha256, or the card format's own
    hash), write, fsync, rename."""
    h = hasher()
    tmp = dest_dir / f".tmp-{threading.get_ident()}-{time.perf_counter_ns()}"
    with urllib.request.urlopen(url, context=ctx, timeout=120) as r, open(tmp, "wb") as f:
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            h.update(b)
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    if h.hexdigest() != expect_sha:
        raise RuntimeError("hash mismatch")
    final = dest_dir / url.rsplit("/", 1)[1]
    os.replace(tmp, final)
    fd = os.open(dest_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return final.unlink


_FSYNC_POOL = ThreadPoolExecutor(16, thread_name_prefix="bench-fsync")


def http_group(conn, names: list[str], dest_dir: Path, shas: dict[str, str]) -> list[Path]:
    """The competitor of one bundle, with our grouped fsync policy: one GET per card over a
    kept-alive connection, BLAKE3 (format 2's hash) while receiving, each file written; then the
    group's files fsynced at once (16 threads, as our BundleReceiver), renamed, the directory
    fsynced once."""
    import blake3

    done = []
    for n in names:
        h = blake3.blake3()
        tmp = dest_dir / f".tmp-{threading.get_ident()}-{time.perf_counter_ns()}"
        conn.request("GET", f"/cards/{n}")
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status} for {n}")
        f = open(tmp, "wb")  # noqa: SIM115 - closed after the group fsync
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            h.update(b)
            f.write(b)
        f.flush()
        if h.hexdigest() != shas[n]:
            raise RuntimeError("BLAKE3 mismatch")
        done.append((f, tmp, dest_dir / n))

    def sync_close(f) -> None:
        os.fsync(f.fileno())
        f.close()

    list(_FSYNC_POOL.map(sync_close, [f for f, _t, _n in done]))
    for _f, tmp, final in done:
        os.replace(tmp, final)
    fd = os.open(dest_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return [final for _f, _t, final in done]


def catchup_row(work: Path, count: int, kib: int, concurrency: int, repeats: int) -> tuple[tuple, dict]:
    """`count` cards of `kib` KiB synced from one peer: our sync (bundles, group commits) vs
    a listing, then one HTTP request per card over keep-alive, hashed as received, same grouped
    fsyncs."""
    import blake3

    from loraflight.federation import Store, SyncPolicy, sync
    from loraflight.federation.sync import BUNDLE_BYTES, BUNDLE_CARDS
    from loraflight.testing import make_card

    root = work / f"catchup-{count}x{kib}k"
    with Store(root) as s:
        for i in range(count):
            s.add(make_card(f"cu-{i:05d}", 1, nbytes=kib << 10, modules=1, seed=i))
    shas = {p.name: blake3.blake3(p.read_bytes()).hexdigest() for p in (root / "cards").iterdir()}
    names = sorted(shas)
    file_size = max((root / "cards" / n).stat().st_size for n in names)
    # the HTTP side's listing: what it fetches first, as our side lists the peer's cards
    manifest = [{"file": n, "blake3": shas[n], "size": (root / "cards" / n).stat().st_size} for n in names]
    (root / "http-index.json").write_text(json.dumps({"cards": manifest}))
    # about the grouping ours makes for a peer that runs `concurrency` streams (sync.bundle_sizes);
    # HTTP has no per-client stream limit, so it keeps every thread busy with `concurrency` groups
    per = max(1, min(BUNDLE_CARDS, -(-count // concurrency), max(1, BUNDLE_BYTES // file_size)))
    procs = []
    p, port = start(_card_server, str(root), None)
    procs.append(p)
    p, http_port = start(_http_server, str(root), None)
    procs.append(p)
    uri = f"grpc://127.0.0.1:{port}"

    def ours() -> Cleanup:
        d = work / f"cu-dest-{time.perf_counter_ns()}"
        with Store(d) as st:
            rep = sync([uri], SyncPolicy(), st, concurrency=concurrency)
            assert len(rep.fetched) == count, rep.errors
        return lambda: shutil.rmtree(d)

    local = threading.local()

    def conn() -> http.client.HTTPConnection:
        c = getattr(local, "conn", None)
        if c is None:
            c = local.conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
        return c

    def http_run() -> Cleanup:
        d = work / f"cu-http-{time.perf_counter_ns()}"
        d.mkdir()
        c = conn()
        c.request("GET", "/http-index.json")
        listed = json.loads(c.getresponse().read())["cards"]
        want = {x["file"]: x["blake3"] for x in listed if not (d / x["file"]).exists()}
        todo = sorted(want)
        groups = [todo[i : i + per] for i in range(0, len(todo), per)]
        with ThreadPoolExecutor(concurrency) as ex:
            got = sum(len(x) for x in ex.map(lambda g: http_group(conn(), g, d, want), groups))
        assert got == count
        return lambda: shutil.rmtree(d)

    try:
        cpu: dict[str, float] = {}
        runs: dict[str, list[float]] = {}
        me = os.getpid()
        res = median_runs(
            {"ours": ours, "http": http_run},
            repeats,
            cpu_pids={"ours": [me, procs[0].pid], "http": [me, procs[1].pid]},
            cpu=cpu,
            runs=runs,
        )
        res.update({f"cpu_{k}": v for k, v in cpu.items()})
        res["per_run"] = run_ratio(runs, "http", "ours")
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    size = f"{kib // 1024} MiB" if kib >= 1024 and kib % 1024 == 0 else f"{kib} KiB"
    row = (
        f"{count} cards of {size}, sync from one peer (concurrency {concurrency})",
        f"a JSON listing, then {count} HTTP GETs over keep-alive, BLAKE3, grouped fsync ({per}/group), "
        f"{concurrency} threads",
        f"{res['http']:.3f} s (CPU {res['cpu_http']:.2f} s)",
        f"{res['ours']:.3f} s (CPU {res['cpu_ours']:.2f} s)",
        f"{res['http'] / res['ours']:.2f}× HTTP (target ≥ 1.5; per-run median {res['per_run']:.2f}×); "
        f"CPU {res['cpu_http'] / res['cpu_ours']:.2f}×",
    )
    return row, res


def print_rows(rows: list[tuple]) -> None:
    head = ("measure", "competing tool", "competitor", "loraflight", "ratio")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def catchup_main(args) -> None:
    """Only the catch-up rows: --small cards of --small-kib, then --many cards of --many-kib."""
    work = Path(tempfile.mkdtemp(prefix="lf-bench-catchup-"))
    try:
        r = max(3, args.repeats)
        print(f"# loraflight catch-up benchmark — {machine()}")
        print(
            f"# medians of {r} runs after a warm-up, competitors alternated; load average {os.getloadavg()}; "
            "CPU = user + system seconds of the client process and that side's server process per run"
        )
        rows, raw = [], {}
        for count, kib in ((args.small, args.small_kib), (args.many, args.many_kib)):
            if count > 0:
                row, res = catchup_row(work, count, kib, args.concurrency, r)
                rows.append(row)
                raw[f"{count}x{kib}KiB"] = res
        print_rows(rows)
        print(f"# raw medians (s): {raw}; load average after {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def median_runs(
    fns: dict[str, Callable[[], Cleanup]],
    repeats: int,
    cpu_pids: dict[str, list[int]] | None = None,
    cpu: dict[str, float] | None = None,
    runs: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Warm up each, then alternate A B A B ...; return median seconds per name. With
    `cpu_pids` (name -> the processes doing that side's work), `cpu` gets each side's median
    CPU seconds per run: the work done, which a shared machine's load does not inflate much."""
    for fn in fns.values():
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            pids = (cpu_pids or {}).get(k, [])
            c0 = cpu_seconds(pids) if pids else 0.0
            times[k].append(timed(fn))
            if pids:
                cpus[k].append(cpu_seconds(pids) - c0)
    if cpu is not None:
        cpu.update({k: statistics.median(v) for k, v in cpus.items() if v})
    if runs is not None:
        runs.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def run_ratio(runs: dict[str, list[float]], slow: str, fast: str) -> float:
    """The median over rounds of runs[slow][i] / runs[fast][i]: each round's two runs were
    taken back to back, so this cancels most of a shared machine's drift between rounds."""
    return statistics.median(a / b for a, b in zip(runs[slow], runs[fast], strict=True))


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = cpu_model()
    import pyarrow

    return (
        f"python {platform.python_version()}, pyarrow {pyarrow.__version__}, nproc {os.cpu_count()}, "
        f"CPU {cpu}, {platform.system()} {platform.release()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--small-kib", type=int, default=1024, help="size of each of the --small cards")
    ap.add_argument("--many", type=int, default=2000, help="catch-up row 2: this many cards (--catchup)")
    ap.add_argument("--many-kib", type=int, default=64, help="size of each of the --many cards")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument(
        "--catchup", action="store_true", help="only the catch-up rows (--small and --many cards, one peer)"
    )
    args = ap.parse_args()
    if args.catchup:
        catchup_main(args)
        return

    import blake3
    import pyarrow.flight as fl

    from loraflight.engine.card import LoRACard
    from loraflight.federation import Client, ClientTLS, Store
    from loraflight.testing import make_ca, make_card

    work = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    try:
        pki = make_ca(work, "bench")
        cert, key = pki["server_cert"].read_bytes(), pki["server_key"].read_bytes()
        big_root = work / "big"
        big = make_card("bench-64m", 1, nbytes=args.mib << 20, modules=max(args.mib // 4, 1))
        # the same rows and batches written as format 1 (sha256 over the stream)
        big1 = LoRACard.build(big.modules, name="bench-64m-f1", created=big.header.created, major=1)
        with Store(big_root) as s:
            big_entry = s.add(big)
            s.add(big1)
        big_file = big_root / "cards" / f"{big.digest}.lora.arrow"
        big1_file = big_root / "cards" / f"{big1.digest}.lora.arrow"
        big_sha = hashlib.sha256(big_file.read_bytes()).hexdigest()
        big1_sha = hashlib.sha256(big1_file.read_bytes()).hexdigest()
        big_b3 = blake3.blake3(big_file.read_bytes()).hexdigest()
        size = big_file.stat().st_size

        procs = []
        p, raw_port = start(_raw_flight_server, str(big_root / "cards"), None)
        procs.append(p)
        p, raw_tls_port = start(_raw_flight_server, str(big_root / "cards"), (cert, key))
        procs.append(p)
        p, ours_port = start(_card_server, str(big_root), None)
        procs.append(p)
        p, ours_tls_port = start(_card_server, str(big_root), (cert, key))
        procs.append(p)
        p, http_port = start(_http_server, str(big_root / "cards"), None)
        procs.append(p)
        p, https_port = start(
            _http_server, str(big_root / "cards"), (str(pki["server_cert"]), str(pki["server_key"]))
        )
        procs.append(p)

        ca = pki["ca"].read_bytes()
        raw = fl.connect(f"grpc://127.0.0.1:{raw_port}")
        raw_tls = fl.connect(f"grpc+tls://127.0.0.1:{raw_tls_port}", tls_root_certs=ca)
        ours = Client(f"grpc://127.0.0.1:{ours_port}")
        ours_tls = Client(f"grpc+tls://127.0.0.1:{ours_tls_port}", tls=ClientTLS(ca=ca))
        entry = ours.info("bench-64m")
        entry1 = ours.info("bench-64m-f1")
        entry_tls = ours_tls.info("bench-64m")
        assert entry.digest == big_entry.digest and entry.header.major == 2 and entry1.header.major == 1
        dest = Store(work / "dest")
        dest_tls = Store(work / "dest-tls")
        http_dest = work / "http-dest"
        http_dest.mkdir()
        sslctx = ssl.create_default_context(cafile=str(pki["ca"]))
        url = f"http://127.0.0.1:{http_port}/{big_file.name}"
        url1 = f"http://127.0.0.1:{http_port}/{big1_file.name}"
        surl = f"https://127.0.0.1:{https_port}/{big_file.name}"

        r = args.repeats
        print(f"# loraflight transfer benchmark — {machine()}")
        print(
            f"# card: {size / 2**20:.1f} MiB file, {len(big)} modules in {len(big.batches)} batches of ≤ 4 MiB "
            f"(format 2; the format-1 card has the same rows and batches); "
            f"medians of {r} runs after a warm-up, competitors alternated; load average {os.getloadavg()}"
        )
        print(
            "# sides: raw = pyarrow do_get, read_chunk until the end; floor = raw do_get, every arriving buffer hashed "
            "(one BLAKE3, or sha256, in the receiving thread; + temp write: each buffer also written to a file); ours transfer phase = our client's receive "
            "loop + the store's staging (piece hashes checked as rows arrive, value check, temp file "
            "written), stopping before fsync; end to end = Client.fetch_entry into a Store (hash while "
            "receiving, write, fsync, open + verify, rename, index) vs urllib GET + hash while receiving "
            "(sha256 for format 1, BLAKE3 for format 2: the same work) + write + fsync + rename"
        )
        b3 = blake3.blake3
        tr_runs: dict[str, list[float]] = {}
        e2e_runs: dict[str, list[float]] = {}
        transfer = median_runs(
            {
                "raw": lambda: raw_do_get(raw, big.digest),
                "floor_b3": lambda: raw_do_get_hashed(raw, big.digest, b3),
                "floor_sha": lambda: raw_do_get_hashed(raw, big1.digest, hashlib.sha256),
                "floor_write": lambda: raw_do_get_hashed(raw, big.digest, b3, write_to=http_dest),
                "ours_recv": lambda: ours_receive(ours, entry),
                "ours_recv_hash": lambda: ours_stage(ours, entry, dest),
                "ours_recv_hash_f1": lambda: ours_stage(ours, entry1, dest),
            },
            r,
            runs=tr_runs,
        )
        e2e = median_runs(
            {
                "ours": lambda: ours_fetch(ours, entry, dest),
                "http": lambda: http_fetch(url, http_dest, big_b3, hasher=b3),
                "ours_f1": lambda: ours_fetch(ours, entry1, dest),
                "http_f1": lambda: http_fetch(url1, http_dest, big1_sha),
            },
            r,
            runs=e2e_runs,
        )
        print(f"# load average after the 64 MiB rows {os.getloadavg()}", flush=True)
        tls = median_runs(
            {
                "raw": lambda: raw_do_get(raw_tls, big.digest),
                "ours_recv_hash": lambda: ours_stage(ours_tls, entry_tls, dest_tls),
                "ours": lambda: ours_fetch(ours_tls, entry_tls, dest_tls),
                "https": lambda: http_fetch(surl, http_dest, big_sha, sslctx),
            },
            r,
        )
        # small cards from one peer: our sync (bundles) vs keep-alive HTTP, same grouped fsyncs
        small_row, small = catchup_row(work, args.small, args.small_kib, args.concurrency, max(3, r // 2 + 1))
        ip = iperf3_rate()

        def gbs(seconds: float, nbytes: int = size) -> str:
            return f"{nbytes / seconds / 1e9:.2f} GB/s"

        rows = []
        if ip is not None:
            rows.append(
                (
                    "one TCP stream on loopback",
                    "iperf3 -c 127.0.0.1 -P 1",
                    f"{ip / 1e9:.2f} GB/s",
                    "—",
                    "reference",
                )
            )
        else:
            rows.append(
                ("one TCP stream on loopback", "iperf3 (not installed or failed)", "—", "—", "skipped")
            )
        rows += [
            (
                f"{args.mib} MiB transfer, receive only",
                "raw pyarrow do_get (RecordBatchStream, read_chunk loop)",
                gbs(transfer["raw"]),
                gbs(transfer["ours_recv"]),
                f"{transfer['raw'] / transfer['ours_recv']:.2f}× of raw (target ≥ 0.9)",
            ),
            (
                f"{args.mib} MiB transfer phase, format 2: receive + piece hashes + value check + temp write",
                "floor: raw do_get + BLAKE3 over what arrives",
                gbs(transfer["floor_b3"]),
                gbs(transfer["ours_recv_hash"]),
                f"{transfer['floor_b3'] / transfer['ours_recv_hash']:.2f}× of the floor (target ≥ 0.95; per-run "
                f"median {run_ratio(tr_runs, 'floor_b3', 'ours_recv_hash'):.2f}×); "
                f"{transfer['raw'] / transfer['ours_recv_hash']:.2f}× of bare raw do_get ({gbs(transfer['raw'])}); "
                f"{transfer['floor_write'] / transfer['ours_recv_hash']:.2f}× of the floor + temp write "
                f"({gbs(transfer['floor_write'])})",
            ),
            (
                f"{args.mib} MiB transfer phase, format 1: receive + sha256 + value check + temp write",
                "floor: raw do_get + BLAKE3 over what arrives",
                gbs(transfer["floor_b3"]),
                gbs(transfer["ours_recv_hash_f1"]),
                f"{transfer['floor_b3'] / transfer['ours_recv_hash_f1']:.2f}× of the floor (per-run "
                f"{run_ratio(tr_runs, 'floor_b3', 'ours_recv_hash_f1'):.2f}×); "
                f"{transfer['floor_sha'] / transfer['ours_recv_hash_f1']:.2f}× of raw + sha256 "
                f"({gbs(transfer['floor_sha'])}); {transfer['raw'] / transfer['ours_recv_hash_f1']:.2f}× of raw",
            ),
            (
                f"{args.mib} MiB end to end, format 2 (verify + fsync + index)",
                "http.server + urllib, BLAKE3 + fsync + rename",
                gbs(e2e["http"]),
                gbs(e2e["ours"]),
                f"{e2e['http'] / e2e['ours']:.2f}× HTTP (target ≥ 1.2; per-run median "
                f"{run_ratio(e2e_runs, 'http', 'ours'):.2f}×)",
            ),
            (
                f"{args.mib} MiB end to end, format 1 (verify + fsync + index)",
                "http.server + urllib, sha256 + fsync + rename",
                gbs(e2e["http_f1"]),
                gbs(e2e["ours_f1"]),
                f"{e2e['http_f1'] / e2e['ours_f1']:.2f}× HTTP (per-run median "
                f"{run_ratio(e2e_runs, 'http_f1', 'ours_f1'):.2f}×)",
            ),
            small_row,
            (
                f"TLS: {args.mib} MiB transfer phase (as above)",
                "raw pyarrow do_get over TLS",
                gbs(tls["raw"]),
                gbs(tls["ours_recv_hash"]),
                f"{tls['raw'] / tls['ours_recv_hash']:.2f}× of raw",
            ),
            (
                f"TLS: {args.mib} MiB end to end",
                "https (ssl) + urllib, same work",
                gbs(tls["https"]),
                gbs(tls["ours"]),
                f"{tls['https'] / tls['ours']:.2f}× HTTPS",
            ),
        ]
        print_rows(rows)
        print(f"# raw medians (s): transfer {transfer}, e2e {e2e}, tls {tls}, small {small}")
        print(f"# load average at the end {os.getloadavg()}")
        for c in (ours, ours_tls):
            c.close()
        raw.close()
        raw_tls.close()
        dest.close()
        dest_tls.close()
        for p in procs:
            p.kill()
            p.join(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
