"""Issue 13, "Who is a peer", on loopback: a hostile host (tests/node/hostile.py) that knows
the public fleet id tries to plant cards, draw tokens, steer fetches, flood the peer table.
Every wait is bounded; each test also passes its variant beyond the reported attack.
(The mDNS spoofing and the flood from another address run in network namespaces:
tests/node/test_netns_hostile.py.)"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pyarrow.flight as flight
import pytest

from loraflight.engine import Engine, keys
from loraflight.engine.authoring.models import tiny_encoder
from loraflight.federation.client import Client
from loraflight.federation.discovery import Announcement
from loraflight.federation.node import Node
from loraflight.federation.peers import MAX_UNCONFIRMED
from loraflight.federation.server import CardServer
from loraflight.federation.store import Store
from loraflight.testing import TINY_BASE, make_ca, node_config, tiny_card, wait_for

from .hostile import HostileServer

PLANTED = 9007199254740991
PEER_TOKEN = "peer-token-0123456789"


@pytest.fixture
def servers(tmp_path: Path):
    """make(name, cls=CardServer, **kw) -> a server on 127.0.0.1:0 over its own store."""
    made: list[tuple[CardServer, Store]] = []

    def make(name: str, cls: type = HostileServer, **kw):
        store = Store(tmp_path / name)
        if cls is CardServer:
            kw.setdefault("listen", "grpc://127.0.0.1:0")
            kw.setdefault("node_id", name)
        srv = cls(store, **kw)
        made.append((srv, store))
        return srv, store

    yield make
    for srv, store in made:
        srv.stop(10)
        store.close()


def _engine() -> Engine:
    model, _ = tiny_encoder(seed=0)
    return Engine(model, base_model=TINY_BASE)


def _secret(tmp_path: Path, value: str = "fleet-secret-0123456789abcdef") -> str:
    p = tmp_path / f"secret-{abs(hash(value))}"
    p.write_text(value + "\n")
    return str(p)


def _refs(store: Store) -> set[str]:
    return {e.ref for e in store.list()}


# ------------------------------------------------------------------ planting


def test_anonymous_notify_plants_nothing_and_the_real_card_arrives(tmp_path, fleet, signer, servers) -> None:
    key, pub = signer
    hostile, hstore = servers("hostile", fleet_id=fleet)
    hstore.add(tiny_card("support-tone", PLANTED, seed=9))  # what the hostile host would plant
    real, rstore = servers("real", cls=CardServer, fleet_id=fleet)
    export = tmp_path / "export"
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{
            "discovery.enabled": False,
            "discovery.peers": [real.location],
            "trust.keys": [pub],
            "tokens.peer": PEER_TOKEN,
            "export_dir": str(export),
        },
    )
    with Node(cfg, engine=_engine()) as n:
        with Client(n.uri, retries=0, timeout=5) as c:
            c.notify(hostile.location, 1)
        wait_for(lambda: hostile.seen("health"), 30, "the node to probe the notified address")
        n.sync_now(trigger="test")
        rounds = n.sync_rounds
        rstore.add(tiny_card("support-tone", 2, key=key), published=True)
        n.sync_now(trigger="test")
        assert n.sync_rounds > rounds
        wait_for(lambda: n.loaded().get("support-tone", {}).get("version") == 2, 30, "support-tone@2 loaded")
        assert f"support-tone@{PLANTED}" not in _refs(n.store)
        assert not hostile.seen("list") and not hostile.seen("get"), "the notified host was synced from"
        assert hostile.tokens_seen() == [], "the peer token went to a notified host"
        wait_for(lambda: (export / "support-tone-v2").is_dir(), 30, "support-tone@2 exported")


def test_a_refused_higher_version_never_shadows_the_admitted_one(tmp_path, fleet, signer, servers) -> None:
    """Variant: the planted version comes from a confirmed peer, unsigned or signed by a stranger,
    and once even from the node's own store: the signed lower version is fetched, loaded, exported."""
    key, pub = signer
    stranger = keys.generate()
    real, rstore = servers("real", cls=CardServer, fleet_id=fleet)
    rstore.add(tiny_card("support-tone", PLANTED, key=stranger, seed=9))
    rstore.add(tiny_card("support-tone", PLANTED - 1, seed=8))  # unsigned
    rstore.add(tiny_card("support-tone", 2, key=key))
    rstore.add(tiny_card("other-base", 5, key=key, base_model="someone/else"))
    rstore.add(tiny_card("other-base", 1, key=key, seed=3))
    export = tmp_path / "export"
    root = tmp_path / "n"
    with Store(root) as pre:  # the node already holds a planted higher version
        pre.add(tiny_card("other-base", 7, seed=4))
    cfg = node_config(
        root,
        fleet,
        **{
            "discovery.enabled": False,
            "discovery.peers": [real.location],
            "trust.keys": [pub],
            "export_dir": str(export),
        },
    )
    with Node(cfg, engine=_engine()) as n:
        wait_for(lambda: n.peers.live(), 30, "the static peer")
        n.sync_now(trigger="test")
        wait_for(
            lambda: (
                n.loaded().get("support-tone", {}).get("version") == 2
                and n.loaded().get("other-base", {}).get("version") == 1
            ),
            30,
            "the admitted versions loaded",
        )
        assert {"support-tone@2", "other-base@1"} <= _refs(n.store)
        wait_for(
            lambda: (export / "support-tone-v2").is_dir() and (export / "other-base-v1").is_dir(),
            30,
            "export",
        )
        assert (export / "support-tone").resolve().name == "support-tone-v2"
    # a restart loads the newest admitted version, not nothing
    with Node(cfg, engine=_engine()) as n2:
        assert n2.loaded()["support-tone"]["version"] == 2 and n2.loaded()["other-base"]["version"] == 1


def test_with_a_fleet_secret_an_mdns_record_plants_nothing(tmp_path, fleet, signer, servers) -> None:
    """Variant: planting through mDNS (the record fed to the peer table as Discovery does)."""
    key, pub = signer
    hostile, hstore = servers("hostile", fleet_id=fleet, node_id="evil")
    hstore.add(tiny_card("support-tone", PLANTED, key=key, seed=9))  # even a card the node would trust
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{"discovery.enabled": False, "trust.keys": [pub], "fleet_secret_file": _secret(tmp_path)},
    )
    with Node(cfg, engine=_engine()) as n:
        ann = Announcement(
            "evil", fleet, "1.0", False, 5, (hostile.location,), "loraflight-evil._loraflight._tcp.local."
        )
        n.peers.announce("added", ann)
        wait_for(lambda: len(hostile.seen("health")) >= 2, 30, "the node to probe the announced host")
        n.sync_now(trigger="test")
        assert not n.store.list()
        assert not hostile.seen("list"), "an unconfirmed mDNS host was synced from"


# ------------------------------------------------------------------ tokens


def test_tokens_go_to_configured_peers_only(tmp_path, fleet, servers) -> None:
    static, _ = servers("static", fleet_id=fleet, node_id="static-peer")
    hostile, _ = servers("hostile", fleet_id=fleet)
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{"discovery.enabled": False, "discovery.peers": [static.location], "tokens.peer": PEER_TOKEN},
    )
    with Node(cfg) as n:
        with Client(n.uri, retries=0, timeout=5) as c:
            c.notify(hostile.location + "/some/path", 1)
        wait_for(lambda: hostile.seen("health") and static.seen("health"), 30, "both probed")
        n.sync_now(trigger="test")
        wait_for(lambda: static.seen("list"), 30, "a sync from the static peer")
        assert static.tokens_seen(), "the configured peer got no token"
        assert hostile.tokens_seen() == [], "the peer token went to a notified host"


def test_a_tls_node_never_dials_a_grpc_address_in_clear_text(tmp_path, fleet, servers) -> None:
    """Variant: the operator wrote grpc:// for a peer of a TLS-configured node (or a hostile
    host answers there in clear text): the node dials TLS, no clear-text call carries the token."""
    pki = make_ca(tmp_path)
    clear, _ = servers("clear", fleet_id=fleet)
    tls = {
        "tls.cert": str(pki["server_cert"]),
        "tls.key": str(pki["server_key"]),
        "tls.ca": str(pki["ca"]),
    }
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{"discovery.enabled": False, "discovery.peers": [clear.location], "tokens.peer": PEER_TOKEN, **tls},
    )
    with Node(cfg) as n:
        with _tls_client(n.uri, pki) as c:
            c.notify(clear.location, 1)
        wait_for(lambda: [p for p in n.peers.all() if p.failures >= 2], 30, "failed TLS probes of the peer")
        n.sync_now(trigger="test")
        assert clear.seen() == [], f"clear-text calls reached the peer: {clear.seen()[:5]}"


def _tls_client(uri: str, pki: dict) -> Client:
    from loraflight.federation.security import ClientTLS

    return Client(uri, tls=ClientTLS.from_files(pki["ca"]), retries=0, timeout=5)


# ------------------------------------------------------------------ steering


def test_listing_locations_steer_no_fetch_and_no_token(tmp_path, fleet, signer, servers) -> None:
    key, pub = signer
    hostile, hstore = servers("hostile", fleet_id=fleet)
    dead = [f"grpc://127.0.0.1:{9 + i}" for i in range(20)]  # discard ports: nothing listens
    card = tiny_card("skill", 1, key=key)
    hstore.add(card)
    # the lister advertises only dead addresses for itself and names the hostile host first
    lister, lstore = servers(
        "lister",
        fleet_id=fleet,
        node_id="lister",
        advertise=[dead[0]],
        named_locations=[hostile.location, *dead],
    )
    lstore.add(card)
    for i in range(30):  # cards whose every listed location but the lister is dead
        lstore.add(tiny_card(f"many-{i}", 1, key=key, seed=i + 10))
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{
            "discovery.enabled": False,
            "discovery.peers": [f"grpc://127.0.0.1:{lister.port}"],
            "trust.keys": [pub],
            "tokens.peer": PEER_TOKEN,
        },
    )
    with Node(cfg) as n:
        wait_for(lambda: n.peers.live(), 30, "the static lister")
        n.sync_now(trigger="test")
        assert "skill@1" in _refs(n.store) and len(n.store.list()) == 31
        assert hostile.seen() == [] and hostile.tokens_seen() == [], (
            "a listing steered a fetch to the hostile host"
        )


def test_a_cli_fetch_tries_few_named_locations_and_sends_them_no_token(
    tmp_path, fleet, signer, servers
) -> None:
    """Variant: the user's own `fetch` (no node, no peer table): a listing's locations get no token."""
    key, _pub = signer
    card = tiny_card("skill", 1, key=key)
    first, fstore = servers("first", fleet_id=fleet)
    far, _ = servers("far", fleet_id=fleet)
    fstore.add(card)
    dead = [f"grpc://127.0.0.1:{9 + i}" for i in range(10)]
    lister, lstore = servers(
        "lister",
        fleet_id=fleet,
        advertise=[dead[0]],
        named_locations=[first.location, *dead[1:5], far.location],
    )
    lstore.add(card)
    with Client(f"grpc://127.0.0.1:{lister.port}", token="user-token-0123", retries=0, timeout=5) as c:
        entry = c.info("skill")
        got = c.fetch_entry(entry)
    assert got.digest == card.digest
    assert first.seen("get") and first.tokens_seen() == [], "the user's token went to a listed location"
    assert far.seen() == [], "more than a few listed locations were tried"


# ------------------------------------------------------------------ floods


def test_a_notify_flood_of_uri_variants_is_folded_capped_and_quiet(
    tmp_path, fleet, signer, servers, caplog: pytest.LogCaptureFixture
) -> None:
    key, pub = signer
    hostile, _ = servers("hostile", fleet_id=fleet, random_ids=True)
    real, rstore = servers("real", cls=CardServer, fleet_id=fleet)
    cfg = node_config(
        tmp_path / "n",
        fleet,
        **{"discovery.enabled": False, "discovery.peers": [real.location], "trust.keys": [pub]},
    )
    with caplog.at_level(logging.INFO, "loraflight"), Node(cfg) as n:
        wait_for(lambda: n.peers.live(), 30, "the real peer")
        with Client(n.uri, retries=0, timeout=5) as c:
            for i in range(600):
                c.notify(f"{hostile.location}/{i}/{uuid.uuid4().hex}", i)
            for i in range(200):  # and made-up hosts
                c.notify(f"grpc://10.{i // 250}.{i % 250}.7:1", i)
        unconfirmed = [p for p in n.peers.all() if not ({"static", "dns"} & p.sources)]
        assert len(unconfirmed) <= MAX_UNCONFIRMED
        assert len([p for p in n.peers.all() if hostile.location.split("//")[1] in " ".join(p.uris)]) <= 1
        rstore.add(tiny_card("skill", 1, key=key), published=True)
        n.sync_now(trigger="test")
        assert "skill@1" in _refs(n.store)
        assert any(p.node_id == "real" for p in n.peers.live())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("loraflight")]
    assert len(warnings) < 40, f"{len(warnings)} warning lines for one flood: {warnings[-3:]}"


def test_a_hello_flood_does_not_keep_a_real_hello_out(tmp_path, fleet, signer) -> None:
    """Variant: hellos instead of notifies, with made-up proofs; then a node that holds the
    secret and knows ours only from its own config is confirmed from its hello and synced from."""
    key, pub = signer
    secret = _secret(tmp_path)
    c1 = node_config(
        tmp_path / "n1",
        fleet,
        **{"discovery.enabled": False, "trust.keys": [pub], "fleet_secret_file": secret},
    )
    with Node(c1) as n1:
        from loraflight.federation.fleet_auth import FleetSecret, hello_request

        fake = FleetSecret(b"not-the-fleet-secret-000")
        fc = flight.FlightClient(n1.uri)
        busy = 0
        for i in range(300):
            body, _ = hello_request(
                fake, node_id=f"x{i}", peer=f"grpc://10.9.{i // 250}.{i % 250}:1", target=n1.uri
            )
            try:
                (ans,) = fc.do_action(flight.Action("hello", json.dumps(body).encode()))
                busy += json.loads(ans.body.to_pybytes()).get("status") == "busy"
            except flight.FlightError:
                pass  # an older node: no `hello` action
        fc.close()
        assert busy > 0, "no hello was ever rate-limited"
        assert all(p.confirmed or "hello" not in p.sources for p in n1.peers.all())
        c2 = node_config(
            tmp_path / "n2",
            fleet,
            **{
                "discovery.enabled": False,
                "discovery.peers": [n1.uri],
                "trust.keys": [pub],
                "fleet_secret_file": secret,
            },
        )
        with Node(c2) as n2:
            wait_for(
                lambda: [p for p in n1.peers.syncable() if p.node_id == n2.node_id], 60, "n1 to confirm n2"
            )
            n2.store.add(tiny_card("skill", 1, key=key), published=True)
            wait_for(lambda: "skill@1" in _refs(n1.store), 60, "n2's card on n1")
            for node in (n1, n2):  # the secret is in no status, peer table or config dump
                assert "fleet-secret-0123456789abcdef" not in json.dumps(node.status(), default=str)
