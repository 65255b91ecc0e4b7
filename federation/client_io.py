"""The client's wire guards: connections whose messages are size-capped as they arrive, a
per-read deadline on streams, and the one-shot `node_action`.

Two connections per peer: the *control* one (listings, FlightInfos, actions) takes messages
of at most `CONTROL_MESSAGE_BYTES` (a whole card header, twice, fits), the *data* one
(do_get) at most `DATA_MESSAGE_BYTES` (one record batch). gRPC refuses a larger message
before it is buffered whole, so a peer cannot make this process hold a 300 MB FlightInfo.

A stream read that brings nothing for `read_timeout` seconds is cancelled by `StallGuard`
(one small thread per transfer) and fails that transfer with a clear error; other transfers
go on.

pyarrow turns a *cancelled* list_flights (gRPC cancels a call whose message is too large, a
node stopping cancels its streams) into a simulated SIGINT (`SignalStopHandler`), which
raises KeyboardInterrupt in the program's main thread whichever thread listed. So a node
that serves the `list` action (protocol.LIST_ACTION_KEY) is listed through it, where a
cancelled stream is a plain error; an older node through list_flights, where `list_infos`
turns the main thread's KeyboardInterrupt back into a PeerError.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from loraflight.engine.card import MAX_HEADER_BYTES, METADATA_KEY, CardDigest, CardHeader, LoRACard
from loraflight.errors import CardError, PeerError

from .connections import RECONNECT_OPTIONS
from .protocol import ACTION_LIST, CatalogEntry, from_flight_error
from .security import ClientTLS, call_headers
from .server import normalize_uri
from .store import hash_batch

CONTROL_MESSAGE_BYTES = 2 * MAX_HEADER_BYTES + (1 << 20)
DATA_MESSAGE_BYTES = 256 << 20  # a card batch stays under 64 MiB; bundles send 4 MiB pieces
READ_TIMEOUT_S = 30.0


def connect(uri: str, tls: ClientTLS | None, max_message: int) -> flight.FlightClient:
    """A Flight connection to `uri` that refuses messages over `max_message` bytes."""
    kw = tls.client_kwargs() if tls is not None else {}
    opts = [("grpc.max_receive_message_length", int(max_message)), *RECONNECT_OPTIONS]
    try:
        return flight.FlightClient(uri, generic_options=opts, **kw)
    except (pa.ArrowException, OSError) as e:
        raise PeerError(f"cannot set up a connection to {uri}: {e}") from None


def was_cancelled_call(exc: BaseException) -> bool:
    """True for the KeyboardInterrupt pyarrow raises in the main thread for a call gRPC
    cancelled (not for one a real signal interrupted)."""
    ctx = exc.__context__
    return isinstance(ctx, flight.FlightCancelledError) and not getattr(ctx, "signum", None)


def list_infos(
    conn: flight.FlightClient,
    blob: bytes,
    opts: flight.FlightCallOptions,
    where: str,
    *,
    by_action: bool = False,
) -> Iterator[Any]:
    """The FlightInfos of a listing, one at a time (each size-capped by `conn`); `by_action`:
    through the `list` action (a node that advertises it), else list_flights."""
    if by_action:
        for result in conn.do_action(flight.Action(ACTION_LIST, blob), opts):
            try:
                yield flight.FlightInfo.deserialize(result.body.to_pybytes())
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise PeerError(f"{where}: a listing entry is not a serialized FlightInfo: {e}") from None
        return
    try:
        yield from conn.list_flights(blob, opts)
    except KeyboardInterrupt as e:
        if not was_cancelled_call(e):
            raise
        raise PeerError(
            f"{where}: the listing was cut off (a message over {CONTROL_MESSAGE_BYTES} bytes, or the "
            "peer cancelled it)"
        ) from None


class StallGuard:
    """Cancels `reader` when no `tick()` came for `timeout` seconds (see the module doc)."""

    def __init__(self, reader: Any, timeout: float, what: str) -> None:
        self.reader = reader
        self.timeout = timeout
        self.what = what
        self.fired = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loraflight-read-deadline", daemon=True)

    def __enter__(self) -> StallGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def tick(self) -> None:
        self._last = time.monotonic()

    def read(self, read: Callable[[], Any]) -> Any:
        """`read()`, mapped to a clear PeerError when this guard cancelled it."""
        try:
            chunk = read()
        except StopIteration:
            if self.fired:
                raise self.error() from None
            raise
        except Exception:
            if self.fired:
                raise self.error() from None
            raise
        self.tick()
        return chunk

    def error(self) -> PeerError:
        return PeerError(
            f"{self.what}: no data for {self.timeout:.0f} s (read deadline); the transfer was cancelled"
        )

    def _watch(self) -> None:
        step = min(1.0, max(0.02, self.timeout / 8))
        while not self._done.wait(step):
            if time.monotonic() - self._last >= self.timeout:
                self.fired = True
                with contextlib.suppress(Exception):
                    self.reader.cancel()
                return


def receive_to_memory(
    uri: str,
    schema: pa.Schema,
    entry: CatalogEntry,
    check_trust: Callable[[CardHeader], None],
    pump: Callable[[Callable[[pa.RecordBatch], None], Callable[[], int]], None],
) -> LoRACard:
    """A card received into memory, verified: `pump(take, received)` feeds it batch by batch;
    nothing past the advertised bytes or rows is kept."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise CardError(f"{uri} sent a stream without a loraflight header")
    header = CardHeader.from_json(raw)
    if header.digest != entry.digest:
        raise CardError(f"{uri} sent {header.ref} with digest {header.digest[:16]}…, not the one asked for")
    check_trust(header)
    digest = CardDigest(header, entry.rows)
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_file(sink, schema)
    state = {"bytes": 0, "rows": 0}

    def take(b: pa.RecordBatch) -> None:
        state["bytes"] += b.get_total_buffer_size()
        state["rows"] += b.num_rows
        if state["bytes"] > entry.size or state["rows"] > entry.rows:
            raise CardError(
                f"{uri} sent more than the {entry.size} bytes / {entry.rows} rows advertised for "
                f"{entry.ref}; transfer refused"
            )
        hash_batch(digest, b, header.dtype)
        writer.write_batch(b)

    pump(take, lambda: state["bytes"])
    writer.close()
    if state["rows"] != entry.rows:
        raise CardError(f"{entry.ref}: received {state['rows']} of {entry.rows} rows (truncated transfer)")
    got = digest.hexdigest()
    if got != entry.digest:
        raise CardError(
            f"{entry.ref}: digest mismatch: advertised {entry.digest[:16]}…, received content hashes to "
            f"{got[:16]}…; the card was tampered with or corrupted in transit; refused"
        )
    # Re-read from one aligned buffer (Flight's buffers are often misaligned).
    f = pa.ipc.open_file(sink.getvalue())
    card = LoRACard(header, [f.get_batch(i) for i in range(f.num_record_batches)])
    card.check_values()
    return card


def node_action(
    uri: str, kind: str, *, token: str | None = None, tls: ClientTLS | None = None, timeout: float = 5.0
) -> Any:
    """Call one JSON action (`status`, `peers`, `node-info`, `health`) on a running node."""
    uri = normalize_uri(uri, tls is not None)
    client = connect(uri, tls, CONTROL_MESSAGE_BYTES)
    opts = flight.FlightCallOptions(timeout=timeout, headers=call_headers(token))
    try:
        results = client.do_action(flight.Action(kind, b""), opts)
        first = next(iter(results), None)
        out = [] if first is None else [first.body.to_pybytes()]
    except flight.FlightError as e:
        raise from_flight_error(e, f"{uri} {kind}") from None
    except pa.ArrowException as e:
        raise PeerError(f"{uri} {kind}: {e}") from None
    finally:
        client.close()
    if not out:
        raise PeerError(f"{uri} answered {kind} with nothing")
    try:
        return json.loads(out[0])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeerError(f"{uri} answered {kind} with invalid JSON: {e}") from None


__all__ = [
    "CONTROL_MESSAGE_BYTES",
    "DATA_MESSAGE_BYTES",
    "READ_TIMEOUT_S",
    "StallGuard",
    "connect",
    "list_infos",
    "node_action",
    "receive_to_memory",
    "was_cancelled_call",
]
