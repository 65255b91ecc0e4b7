"""Who is a peer, applied: the node's one rule for dialling peers, and its `notify` and
`hello` handlers (docs/operations.md, "Security model"; docs/protocol.md, "Hello").

`PeerGate` holds the node's fleet secret and its TLS settings, and applies:

* `client(uri, timeout)`: every call to a peer. On a node configured for TLS every address
  is dialled over TLS (``grpc://`` becomes ``grpc+tls://``: no downgrade by URI scheme); the
  peer token goes only to a confirmed peer's address, or over TLS checked by the fleet CA;
* `prove(client, node_id)`: what a peer that just answered `health` proves ("ca", "secret"
  through a `hello` challenge, or nothing);
* `on_notify` / `on_hello`: rate-limited per caller (`ratelimit`), they never add a sync
  source by themselves; a `hello` whose caller proved the fleet secret gets its address
  probed, and that probe's own challenge confirms it;
* `admits(entry)`: the trust policy as the sync planner asks it (`sync.plan_sync`).

The pure rules live in `uris`, `ratelimit`, `fleet_auth` and `peers`; this class is the glue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from loraflight.errors import ConfigError, LoraflightError, TrustError

from ..client import Client
from ..client_io import connect
from ..config import NodeConfig
from ..connections import ConnectionPool
from ..fleet_auth import (
    FleetSecret,
    ReplayCache,
    answer_proved,
    hello_answer,
    hello_request,
    parse_hello_request,
)
from ..peers import LIVE, Peer, PeerTable
from ..protocol import PROTOCOL_VERSION, CatalogEntry
from ..ratelimit import RateLimiter, SummaryLog
from ..security import ClientTLS
from ..store import Store
from ..token_files import read_fleet_secret
from ..uris import canonical_uri, dial_uri
from .bounds import client_bounds
from .hotload import trust_refusal

C = TypeVar("C", bound=Client)

log = logging.getLogger("loraflight.federation.node")

# per caller (its token when it sent a valid one, else its address): calls a second, burst
NOTIFY_RATE, NOTIFY_BURST = 5.0, 20.0
HELLO_RATE, HELLO_BURST = 2.0, 10.0
# addresses no peer holds yet, named by anonymous notifies from all callers together
NEW_ADDRESS_RATE, NEW_ADDRESS_BURST = 2.0, 10.0


class PeerGate:
    """The node's rules for who is a peer (see the module doc)."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        client_tls: ClientTLS | None,
        peers: Callable[[], PeerTable | None],
        store: Callable[[], Store | None],
        node_id: Callable[[], str],
        my_uri: Callable[[], str],
        base_model: Callable[[], str | None],
        engine_keys: Callable[[], Collection[str]],
        mark_dirty: Callable[[str, str], None],
        wake_peers: Callable[[], None],
    ) -> None:
        self.config = config
        self.client_tls = client_tls
        self._peers = peers
        self._store = store
        self._node_id = node_id
        self._my_uri = my_uri
        self._base_model = base_model
        self._engine_keys = engine_keys
        self._mark_dirty = mark_dirty
        self._wake_peers = wake_peers
        t = config.tls
        self.secret: FleetSecret | None = read_fleet_secret(config.fleet_secret_file)
        self.fleet_ca = bool(t.ca and t.cert)  # TLS with the fleet CA: a peer answering over TLS is in
        self.callers_vetted = self.fleet_ca and t.verify_client  # ... and every caller showed its cert
        self.dial_tls = bool(t.cert or t.ca or t.client_cert)  # configured for TLS: TLS to every peer
        self._replay = ReplayCache()
        self._notify_limit = RateLimiter(NOTIFY_RATE, NOTIFY_BURST)
        self._hello_limit = RateLimiter(HELLO_RATE, HELLO_BURST)
        self._new_limit = RateLimiter(NEW_ADDRESS_RATE, NEW_ADDRESS_BURST, max_keys=1)
        self._quiet = SummaryLog(log, 10.0)
        self.pool = ConnectionPool(connect)  # kept connections to the peers (connections.py)

    @property
    def open_fleet(self) -> bool:
        """No fleet secret and no fleet CA: mDNS peers are sync sources (a trusted LAN)."""
        return self.secret is None and not self.fleet_ca

    # -- calls this node makes

    def client(self, uri: str, timeout: float, *, retries: int = 0, cls: type[C] = Client) -> C:  # type: ignore[assignment]
        """Every call this node makes to a peer goes through here: the one rule for TLS and token
        (`cls`: a `Client` subclass, e.g. the membership's `SwimClient`)."""
        dial = dial_uri(uri, tls=self.dial_tls)
        tls = self.client_tls if dial.startswith("grpc+tls") else None
        token = self.config.tokens.peer or None
        peers = self._peers()
        if token and not ((peers is not None and peers.vetted(dial)) or (tls is not None and self.fleet_ca)):
            token = None
        return cls(dial, token, tls, timeout, retries=retries, pool=self.pool, **client_bounds(self.config))

    def close(self) -> None:
        """Close the kept connections (the node stops)."""
        self.pool.close()

    def prove(self, client: Client, node_id: str) -> str:
        """What a peer that just answered `health` as `node_id` proves: "ca" (TLS, fleet CA),
        "secret" (its `hello` answer carries the fleet secret's HMAC over our fresh nonce), or ""."""
        if self.fleet_ca and client.tls is not None:
            return "ca"
        if self.secret is None:
            return ""
        me = self._node_id()
        body, nonce = hello_request(self.secret, node_id=me, peer=self._my_uri(), target=client.uri)
        try:
            ans = client.hello(body)
        except LoraflightError as e:  # an older node (no `hello`), or one that refuses it
            self._quiet.log(logging.INFO, "hello-failed", "hello to %s failed: %s", client.uri, e)
            return ""
        ok = ans.get("node_id") == node_id and answer_proved(
            self.secret, ans, nonce=nonce, caller_id=me, target=client.uri
        )
        if not ok:
            self._quiet.log(
                logging.WARNING,
                "hello-unproved",
                "%s did not prove the fleet secret: it is not synced from",
                client.uri,
            )
        return "secret" if ok else ""

    def admits(self, entry: CatalogEntry) -> bool:
        """Whether this node's trust policy keeps and serves `entry` (store, engine, base model)."""
        store = self._store()
        if store is not None:
            try:
                store.check_admission(entry.header)
            except TrustError:
                return False
            except LoraflightError:
                pass  # a conflict or a withdrawal: the plan and the fetch report it
        b = self._base_model()
        if b and entry.header.base_model and entry.header.base_model != b:
            return False
        return trust_refusal(entry, self.config.trust.engine, self._engine_keys()) is None

    # -- calls this node answers

    def _syncable(self, peers: PeerTable, peer: Peer) -> bool:
        return peer.state == LIVE and any(p is peer for p in peers.syncable())

    def on_notify(self, peer_uri: str, source: str = "addr:?") -> None:
        """A `notify` (runs on a server thread). Anyone who can reach the node may send one, so
        it adds no sync source: it wakes sync for a peer this node syncs from, or names an
        address the next probe checks (capped; confirmed only by the fleet CA or the fleet
        secret's hello)."""
        peers = self._peers()
        if peers is None:
            return
        if not self._notify_limit.allow(source):
            self._quiet.log(
                logging.WARNING, "notify-rate", "notify from %s over its rate limit: ignored", source
            )
            return
        try:
            uri = canonical_uri(peer_uri)
        except ConfigError:
            return
        peer = peers.find_uri(uri)
        if peer is not None:
            if self._syncable(peers, peer):
                self._mark_dirty(peer.key, "notify")
            elif peer.state != LIVE:
                self._wake_peers()
            return
        if self.callers_vetted:  # mutual TLS: the caller presented a certificate of the fleet CA
            peers.add_address("hello", uri)
        elif self._new_limit.allow("new"):
            peers.add_address("notify", uri)
        else:
            self._quiet.log(
                logging.WARNING, "notify-new", "too many new addresses in notifies; %s ignored", uri
            )
            return
        self._wake_peers()

    def on_hello(self, body: dict[str, Any], source: str) -> dict[str, Any]:
        """A `hello`: answer with our proof; a caller that proved the fleet secret gets its
        address probed (the probe's own challenge confirms it)."""
        if not self._hello_limit.allow(source):
            self._quiet.log(
                logging.WARNING, "hello-rate", "hello from %s over its rate limit: refused", source
            )
            # answered, not raised: a refusal would be logged once per call (server.edge)
            return {
                "status": "busy",
                "error": "too many hello calls from this caller; try again in a few seconds",
            }
        req = parse_hello_request(body)
        peers = self._peers()
        if (req.proved(self.secret, self._replay) or self.callers_vetted) and peers is not None:
            try:
                uri = canonical_uri(req.peer) if req.peer else ""
            except ConfigError:
                uri = ""
            peer = peers.find_uri(uri) if uri else None
            if peer is not None and self._syncable(peers, peer):
                self._mark_dirty(peer.key, "hello")
            elif uri:
                if peer is None:
                    peers.add_address("hello", uri)
                self._wake_peers()
        elif self.secret is not None and req.proof:
            self._quiet.log(
                logging.WARNING, "hello-bad", "a hello from %s failed the fleet secret check", source
            )
        store = self._store()
        extra = {
            "status": "ok",
            "fleet_id": self.config.fleet,
            "epoch": store.epoch if store is not None else 0,
            "protocol": PROTOCOL_VERSION,
        }
        return hello_answer(self.secret, req, node_id=self._node_id(), extra=extra)


__all__ = [
    "HELLO_BURST",
    "HELLO_RATE",
    "NEW_ADDRESS_BURST",
    "NEW_ADDRESS_RATE",
    "NOTIFY_BURST",
    "NOTIFY_RATE",
    "PeerGate",
]
