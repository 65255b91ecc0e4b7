"""Catching up: several listed cards from one node in one `DoGet` (a bundle), stored as a group.

The wire format is docs/protocol.md, "Catching up: bundles"; the receiving side (temp files,
verification, the group commit) is `store.bundle.BundleReceiver`. `Client.fetch_bundle` is
the public entry point.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pyarrow.flight as flight

from loraflight.engine.card import verify_signature
from loraflight.errors import CardError, LoraflightError, PeerError

from .client_io import StallGuard
from .protocol import CatalogEntry, bundle_ticket, dedupe
from .store import Store

if TYPE_CHECKING:
    from .client import Client


def fetch_bundle(
    client: Client,
    entries: Sequence[CatalogEntry],
    *,
    store: Store,
    trusted: Iterable[str] | None = None,
    require_signed: bool = False,
    locations: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, CatalogEntry | LoraflightError]:
    """Fetch several listed cards from this node in one stream (a bundle) and store them as
    one group (one directory fsync, one index transaction); per digest its stored entry or
    the error that kept it out. No failover here: the caller retries what failed card by
    card (`fetch_entry_stored`). A node that does not advertise bundles (`get_many`) is
    fetched card by card here, one `DoGet` each."""
    tset = None if trusted is None else set(trusted)
    out: dict[str, CatalogEntry | LoraflightError] = {}
    want: list[CatalogEntry] = []
    for e in entries:
        try:
            verify_signature(e.header, tset, require_signed=require_signed)
            existing = store.check_admission(e.header)
        except LoraflightError as err:
            out[e.digest] = err
            continue
        if existing is not None:
            out[e.digest] = existing
        elif e.size > client.max_card_bytes:
            out[e.digest] = PeerError(
                f"{client.uri} advertises {e.ref} at {e.size} bytes, more than this client's limit of "
                f"{client.max_card_bytes}; refused"
            )
        elif e.digest not in out:
            want.append(e)
    if not want:
        return out
    limit = client.get_many()
    if not limit:  # a node from before bundles: card by card, from this node only
        for e in want:
            try:
                out[e.digest] = client._fetch_once(e, store, tset, require_signed, None)[1] or e
            except LoraflightError as err:
                out[e.digest] = err
        return {e.digest: out[e.digest] for e in entries if e.digest in out}
    for i in range(0, len(want), limit):
        out.update(_bundle_once(client, want[i : i + limit], store, locations or {}))
    return {e.digest: out[e.digest] for e in entries if e.digest in out}


def _bundle_once(
    client: Client, want: Sequence[CatalogEntry], store: Store, locations: dict[str, tuple[str, ...]]
) -> dict[str, CatalogEntry | LoraflightError]:
    locs = {e.digest: tuple(dedupe([client.uri, *e.locations, *locations.get(e.digest, ())])) for e in want}
    deadline = time.monotonic() + client.fetch_timeout
    total = sum(e.size for e in want)
    opts = client._opts(timeout=client.fetch_timeout)
    ticket = flight.Ticket(bundle_ticket([e.digest for e in want]))
    with store.receive_bundle(want, source=client.uri, locations=locs) as rx:
        try:
            reader = client._call("do_get", lambda: client._data().do_get(ticket, opts))
            try:
                with StallGuard(reader, client.read_timeout, f"{client.uri} bundle") as guard:
                    for _ in range(total // 4096 + 2 * len(want) + 2):  # bounded: pieces are never tiny
                        try:
                            chunk = guard.read(lambda: client._call("do_get", reader.read_chunk))
                        except StopIteration:
                            break
                        if chunk.data is not None:
                            rx.write_batch(chunk.data)
                        if time.monotonic() > deadline:
                            raise PeerError(
                                f"{client.uri}: a bundle exceeded its {client.fetch_timeout:.0f} s deadline"
                            )
                    else:
                        raise PeerError(f"{client.uri} sent a bundle of more pieces than its cards allow")
            except BaseException:
                with contextlib.suppress(Exception):
                    reader.cancel()
                raise
        except (CardError, PeerError) as e:
            # what was verified still commits; the rest reports the stream's error
            for d in rx.missing():
                rx.errors[d] = e
        return rx.commit()


__all__ = ["fetch_bundle"]
