"""The serving benchmark's clients: an HTTP load generator (threads, keep-alive) and a Flight
`do_exchange` embedder. Torch-free: they measure servers running in other processes.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    """One measured run: `requests` answered in `wall` seconds, each one's latency in `lat`."""

    requests: int
    wall: float
    lat: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    items: int = 0  # texts embedded (requests x texts per request)

    @property
    def rps(self) -> float:
        return self.requests / self.wall if self.wall > 0 else 0.0

    @property
    def items_per_s(self) -> float:
        return self.items / self.wall if self.wall > 0 else 0.0

    def pct(self, q: float) -> float:
        """The q-quantile (0..1) of the latencies, nearest rank; NaN with none."""
        if not self.lat:
            return math.nan
        s = sorted(self.lat)
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _post(client: Any, model: str, texts: list[str] | str) -> tuple[int, int, str]:
    """(status, vectors returned, error text) for one embeddings request."""
    r = client.post(
        "/v1/embeddings",
        content=json.dumps({"model": model, "input": texts}),
        headers={"content-type": "application/json"},
    )
    if r.status_code != 200:
        return r.status_code, 0, r.text[:200]
    body = json.loads(r.content)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0].get("embedding"), list):
        return r.status_code, 0, f"not an embeddings response: {r.text[:200]}"
    return 200, len(data), ""


class Driver:
    """`concurrency` keep-alive HTTP clients against one server, reused across runs."""

    def __init__(self, base_url: str, concurrency: int, timeout: float = 60.0) -> None:
        import httpx

        self.base_url = base_url
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=300)
        self.clients = [
            httpx.Client(base_url=base_url, timeout=timeout, limits=limits, trust_env=False)
            for _ in range(concurrency)
        ]

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        r = self.clients[0].post("/v1/embeddings", json={"model": model, "input": texts})
        if r.status_code != 200:
            raise RuntimeError(
                f"{self.base_url} answered {r.status_code} for model {model!r}: {r.text[:200]}"
            )
        return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d.get("index", 0))]

    def run(self, models: list[str], texts: list[str], requests: int, per_request: int = 1) -> Result:
        """`requests` requests from every client at once; request i asks for models[i % len]
        (round-robin, so requests for different models are in flight together) with one text,
        or `per_request` consecutive texts."""
        lock = threading.Lock()
        state = {"next": 0}
        lat: list[float] = []
        errs: list[str] = []
        items = [0]
        start = threading.Barrier(len(self.clients) + 1, timeout=60)

        def body(i: int) -> list[str] | str:
            if per_request == 1:
                return texts[i % len(texts)]
            lo = (i * per_request) % len(texts)
            return texts[lo : lo + per_request]

        def worker(client: Any) -> None:
            start.wait()
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= requests:
                    return
                t = time.perf_counter()
                try:
                    status, n, err = _post(client, models[i % len(models)], body(i))
                except Exception as e:  # a refused connection, a timeout: counted, never fatal
                    status, n, err = 0, 0, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t
                with lock:
                    if status == 200:
                        lat.append(dt)
                        items[0] += n
                    else:
                        errs.append(f"HTTP {status}: {err}" if status else err)

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in self.clients]
        for th in threads:
            th.start()
        start.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join(timeout=600)
        wall = time.perf_counter() - t0
        if any(th.is_alive() for th in threads):
            errs.append("a client thread was still running after 600 s")
        return Result(len(lat), wall, lat, len(errs), errs[0] if errs else "", items[0])


def exchange(
    uri: str,
    models: list[str],
    texts: list[str],
    *,
    batch: int = 1000,
    per_row: bool = True,
    timeout: float = 600.0,
) -> tuple[float, int, int]:
    """Embed `texts` through Flight `do_exchange` (command {"op": "embed", "model": models[0]}),
    `batch` rows per record batch, with a per-row `adapter` column cycling over `models` when
    `per_row`. Returns (seconds, rows back, embedding width); raises on a bad answer."""
    import pyarrow as pa
    import pyarrow.flight as fl

    client = fl.FlightClient(uri)
    try:
        cmd = json.dumps({"op": "embed", "model": models[0]}).encode()
        opts = fl.FlightCallOptions(timeout=timeout)
        fields = [pa.field("text", pa.string())]
        if per_row:
            fields.append(pa.field("adapter", pa.string()))
        schema = pa.schema(fields)
        batches = []
        for lo in range(0, len(texts), batch):
            cols = [pa.array(texts[lo : lo + batch], pa.string())]
            if per_row:
                cols.append(
                    pa.array([models[(lo + i) % len(models)] for i in range(len(cols[0]))], pa.string())
                )
            batches.append(pa.record_batch(cols, schema=schema))
        failure: list[BaseException] = []
        t0 = time.perf_counter()
        writer, reader = client.do_exchange(fl.FlightDescriptor.for_command(cmd), opts)

        def send() -> None:
            try:
                writer.begin(schema)
                for b in batches:
                    writer.write_batch(b)
                writer.done_writing()
            except BaseException as e:  # surfaced by the reader's error, or below
                failure.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        rows, width = 0, 0
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            data = chunk.data
            if data is None:
                continue
            if "embedding" not in data.schema.names:
                raise RuntimeError(f"do_exchange answered columns {data.schema.names}, no 'embedding'")
            col = data.column("embedding")
            width = getattr(col.type, "list_size", 0) or width
            rows += data.num_rows
            if rows >= len(texts):
                break
        dt = time.perf_counter() - t0
        sender.join(timeout=timeout)
        writer.close()
        if failure:
            raise RuntimeError(f"do_exchange upload failed: {failure[0]}")
        if rows != len(texts):
            raise RuntimeError(f"do_exchange returned {rows} rows for {len(texts)} texts")
        return dt, rows, width
    finally:
        client.close()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


__all__ = ["Driver", "Result", "exchange", "median"]
