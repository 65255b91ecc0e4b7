"""Transfer benchmark: loraflight over Flight vs raw pyarrow do_get, http.server + urllib, iperf3.

Run: .venv/bin/python bench/bench_transfer.py [--repeats 5] [--mib 64] [--small 200]

Every server runs in its own spawned process and all are up at once; the client side runs
here, alternating competitors (A B A B ...) so drift hits both alike. Each figure is the
median of --repeats runs after one warm-up. Ratios compare tools measured in this run.
Clean-up between runs (dropping the received file, removing the card from the store,
deleting a run's directory) happens after the clock stops, for every competitor alike.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import multiprocessing as mp
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    import pyarrow.flight as fl

    client.do_get(fl.Ticket(digest.encode())).read_all()
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


def http_fetch(url: str, dest_dir: Path, expect_sha: str, ctx=None) -> Cleanup:
    """The competitor end to end: GET, sha256 while receiving, write, fsync, rename."""
    h = hashlib.sha256()
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
        raise RuntimeError("sha256 mismatch")
    final = dest_dir / url.rsplit("/", 1)[1]
    os.replace(tmp, final)
    fd = os.open(dest_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return final.unlink


def median_runs(fns: dict[str, Callable[[], Cleanup]], repeats: int) -> dict[str, float]:
    """Warm up each, then alternate A B A B ...; return median seconds per name."""
    for fn in fns.values():
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def iperf3_rate(seconds: int = 3) -> float | None:
    exe = shutil.which("iperf3")
    if exe is None:
        return None
    import socket

    with socket.socket() as probe:  # a free port (iperf3 cannot be told to pick one)
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    srv = subprocess.Popen(
        [exe, "-s", "-1", "-B", "127.0.0.1", "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(50):
            r = subprocess.run(
                [exe, "-c", "127.0.0.1", "-p", port, "-t", str(seconds), "-P", "1", "-J"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if r.returncode == 0:
                import json

                try:
                    return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 8
                except (ValueError, KeyError, TypeError):
                    return None  # iperf3 reported an error instead of a result
            time.sleep(0.1)
        return None
    finally:
        with contextlib.suppress(Exception):
            srv.kill()
            srv.wait(5)


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
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
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()

    import pyarrow.flight as fl

    from loraflight.federation import Client, ClientTLS, Store, SyncPolicy, sync
    from loraflight.testing import make_ca, make_card

    work = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    try:
        pki = make_ca(work, "bench")
        cert, key = pki["server_cert"].read_bytes(), pki["server_key"].read_bytes()
        big_root, small_root = work / "big", work / "small"
        big = make_card("bench-64m", 1, nbytes=args.mib << 20, modules=max(args.mib // 4, 1))
        with Store(big_root) as s:
            big_entry = s.add(big)
        smalls = [
            make_card(f"small-{i:03d}", 1, nbytes=1 << 20, modules=1, seed=i) for i in range(args.small)
        ]
        with Store(small_root) as s:
            for c in smalls:
                s.add(c)
        big_file = big_root / "cards" / f"{big.digest}.lora.arrow"
        big_sha = hashlib.sha256(big_file.read_bytes()).hexdigest()
        small_shas = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (small_root / "cards").iterdir()
        }
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
        p, small_port = start(_card_server, str(small_root), None)
        procs.append(p)
        p, http_port = start(_http_server, str(big_root / "cards"), None)
        procs.append(p)
        p, https_port = start(
            _http_server, str(big_root / "cards"), (str(pki["server_cert"]), str(pki["server_key"]))
        )
        procs.append(p)
        p, http_small_port = start(_http_server, str(small_root / "cards"), None)
        procs.append(p)

        ca = pki["ca"].read_bytes()
        raw = fl.connect(f"grpc://127.0.0.1:{raw_port}")
        raw_tls = fl.connect(f"grpc+tls://127.0.0.1:{raw_tls_port}", tls_root_certs=ca)
        ours = Client(f"grpc://127.0.0.1:{ours_port}")
        ours_tls = Client(f"grpc+tls://127.0.0.1:{ours_tls_port}", tls=ClientTLS(ca=ca))
        entry = ours.info("bench-64m")
        entry_tls = ours_tls.info("bench-64m")
        assert entry.digest == big_entry.digest
        dest = Store(work / "dest")
        dest_tls = Store(work / "dest-tls")
        http_dest = work / "http-dest"
        http_dest.mkdir()
        sslctx = ssl.create_default_context(cafile=str(pki["ca"]))
        url = f"http://127.0.0.1:{http_port}/{big_file.name}"
        surl = f"https://127.0.0.1:{https_port}/{big_file.name}"

        r = args.repeats
        print(f"# loraflight transfer benchmark — {machine()}")
        print(
            f"# card: {size / 2**20:.1f} MiB file, {len(big)} modules in {len(big.batches)} batches of ≤ 4 MiB; "
            f"medians of {r} runs after a warm-up, competitors alternated"
        )
        transfer = median_runs(
            {
                "raw": lambda: raw_do_get(raw, big.digest),
                "ours_recv": lambda: ours_receive(ours, entry),
                "ours_recv_hash": lambda: ours_stage(ours, entry, dest),
            },
            r,
        )
        e2e = median_runs(
            {
                "ours": lambda: ours_fetch(ours, entry, dest),
                "http": lambda: http_fetch(url, http_dest, big_sha),
            },
            r,
        )
        tls = median_runs(
            {
                "raw": lambda: raw_do_get(raw_tls, big.digest),
                "ours_recv_hash": lambda: ours_stage(ours_tls, entry_tls, dest_tls),
                "ours": lambda: ours_fetch(ours_tls, entry_tls, dest_tls),
                "https": lambda: http_fetch(surl, http_dest, big_sha, sslctx),
            },
            r,
        )
        # 200 small cards: our sync (bounded concurrency) vs the same number of HTTP requests
        small_uri = f"grpc://127.0.0.1:{small_port}"
        names = sorted(small_shas)

        def ours_small() -> Cleanup:
            d = work / f"small-dest-{time.perf_counter_ns()}"
            with Store(d) as st:
                rep = sync([small_uri], SyncPolicy(), st, concurrency=args.concurrency)
                assert len(rep.fetched) == args.small, rep.errors
            return lambda: shutil.rmtree(d)

        def http_small() -> Cleanup:
            d = work / f"http-small-{time.perf_counter_ns()}"
            d.mkdir()
            with ThreadPoolExecutor(args.concurrency) as ex:
                list(
                    ex.map(
                        lambda n: http_fetch(f"http://127.0.0.1:{http_small_port}/{n}", d, small_shas[n]),
                        names,
                    )
                )
            return lambda: shutil.rmtree(d)

        small_r = max(3, r // 2 + 1)
        small = median_runs({"ours": ours_small, "http": http_small}, small_r)
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
                "raw pyarrow do_get (RecordBatchStream, read_all)",
                gbs(transfer["raw"]),
                gbs(transfer["ours_recv"]),
                f"{transfer['raw'] / transfer['ours_recv']:.2f}× of raw (target ≥ 0.9)",
            ),
            (
                f"{args.mib} MiB transfer phase: receive + hash + value check + temp write",
                "raw pyarrow do_get (receive only)",
                gbs(transfer["raw"]),
                gbs(transfer["ours_recv_hash"]),
                f"{transfer['raw'] / transfer['ours_recv_hash']:.2f}× of raw (target ≥ 0.9)",
            ),
            (
                f"{args.mib} MiB end to end (verify + fsync + index)",
                "http.server + urllib, sha256 + fsync + rename",
                gbs(e2e["http"]),
                gbs(e2e["ours"]),
                f"{e2e['http'] / e2e['ours']:.2f}× HTTP (target ≥ 1.2)",
            ),
            (
                f"{args.small} cards of 1 MiB (concurrency {args.concurrency})",
                f"{args.small} HTTP requests, same work, {args.concurrency} threads",
                f"{small['http']:.3f} s",
                f"{small['ours']:.3f} s",
                f"{small['http'] / small['ours']:.2f}× HTTP (target ≥ 1.5)",
            ),
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
        head = ("measure", "competing tool", "competitor", "loraflight", "ratio")
        widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
        print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        print(f"# raw medians (s): transfer {transfer}, e2e {e2e}, tls {tls}, small {small}")
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
