"""Hostile peers and refused callers: each refusal names the problem and changes nothing."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from loraflight.engine import keys
from loraflight.errors import AuthError, CardError, PeerError, TrustError
from loraflight.federation import Client, ClientTLS, ServerTLS, SyncPolicy, sync
from loraflight.federation.protocol import CatalogEntry, entry_to_flight_info
from loraflight.testing import make_ca, make_card


class HostileServer(flight.FlightServerBase):
    """Lists `entry` (what it claims) and streams `payload`'s batches under `schema` (what it sends)."""

    def __init__(self, entry: CatalogEntry, schema: pa.Schema, batches: list[pa.RecordBatch]):
        super().__init__("grpc://127.0.0.1:0")
        self.uri = f"grpc://127.0.0.1:{self.port}"
        self.entry = entry.with_locations([self.uri])
        self.schema = schema
        self.batches = [pa.record_batch(b.columns, schema=schema) for b in batches]

    def list_flights(self, context, criteria):
        return iter([entry_to_flight_info(self.entry, flight)])

    def get_flight_info(self, context, descriptor):
        return entry_to_flight_info(self.entry, flight)

    def do_action(self, context, action):
        return iter([b'{"status": "ok", "protocol": "1.0"}'])

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(pa.Table.from_batches(self.batches, schema=self.schema))


def honest_entry(card, size_factor=1.0):
    return CatalogEntry(header=card.header, size=int(len(card.to_bytes()) * size_factor), rows=len(card))


def snapshot(store):
    return (
        store.epoch,
        sorted(e.digest for e in store.list()),
        sorted(p.name for p in store.cards_dir.iterdir()),
        sorted(p.name for p in store.tmp_dir.iterdir()),
    )


def fetch_refused(store, server, exc, match):
    before = snapshot(store)
    with server, Client(server.uri, retries=0, timeout=10) as c:
        with pytest.raises(exc, match=match):
            c.fetch(server.entry.name, server.entry.version, store=store)
        report = sync([server.uri], SyncPolicy(), store)
    assert report.errors and not report.fetched
    assert match.split("|")[0] in next(iter(report.errors.values())) or exc is TrustError
    assert snapshot(store) == before
    store.close()


def test_tampered_card_refused(make_store):
    s = make_store()
    s.add(make_card("keep", 1))
    real = make_card("skill", 1, nbytes=5 << 20, modules=4)
    fake = make_card("skill", 1, nbytes=5 << 20, modules=4, seed=99)  # same shapes, other values
    fetch_refused(
        s, HostileServer(honest_entry(real), real.schema, fake.batches), CardError, "digest mismatch"
    )


def test_card_larger_than_advertised_refused(make_store):
    s = make_store()
    real = make_card("big", 1, nbytes=9 << 20, modules=6)
    fetch_refused(
        s, HostileServer(honest_entry(real, 0.4), real.schema, real.batches), CardError, "advertised"
    )


def test_unsigned_card_refused_by_signed_node(make_store):
    s = make_store(trust="signed")
    real = make_card("u", 1)
    fetch_refused(s, HostileServer(honest_entry(real), real.schema, real.batches), TrustError, "unsigned")


def test_untrusted_key_refused_by_signed_node(make_store):
    s = make_store(trust="signed")
    s.trust_add(keys.public_key_b64(keys.generate().public_key()))
    real = make_card("u", 1, key=keys.generate())
    fetch_refused(
        s, HostileServer(honest_entry(real), real.schema, real.batches), TrustError, "does not trust"
    )


def test_other_keys_newer_version_of_owned_name_refused(make_store):
    s = make_store(trust="signed")
    owner, other = keys.generate(), keys.generate()
    for k in (owner, other):
        s.trust_add(keys.public_key_b64(k.public_key()))
    s.add(make_card("owned", 1, key=owner))
    real = make_card("owned", 2, key=other)
    fetch_refused(
        s, HostileServer(honest_entry(real), real.schema, real.batches), TrustError, "belongs to signer"
    )


def test_forged_signature_refused_even_open(make_store):
    s = make_store()
    k = keys.generate()
    real = make_card("forged", 1, key=k)
    # keep the signer, swap the signature for one over another digest
    other_sig = make_card("forged", 1, seed=7, key=k).header.signature
    forged_header = dataclasses.replace(real.header, signature=other_sig)
    forged = real.with_header(forged_header)
    fetch_refused(
        s, HostileServer(honest_entry(forged), forged.schema, forged.batches), TrustError, "signature"
    )


# -- tokens and TLS


def test_writes_need_a_valid_token_reads_optional(make_store, make_server):
    s = make_store()
    srv = make_server(s, write_tokens=["write-secret"], read_tokens=["read-secret"])
    card = make_card("t", 1)
    for token in (None, "wrong", "read-secret"):
        with Client(srv.location, token=token, retries=0) as c, pytest.raises(AuthError):
            c.publish(card)
    assert len(s) == 0 and list(s.tmp_dir.iterdir()) == []
    with Client(srv.location, token=None, retries=0) as c, pytest.raises(AuthError, match="read token"):
        c.list()
    with Client(srv.location, token="write-secret") as c:
        c.publish(card)
    with Client(srv.location, token="read-secret") as c:
        assert [e.ref for e in c.list()] == ["t@1"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return make_ca(d, "good"), make_ca(d, "evil")


def test_tls_untrusted_ca_refused_trusted_ok(make_store, make_server, pki):
    good, evil = pki
    s = make_store()
    srv = make_server(
        s, tls=ServerTLS.from_files(good["server_cert"], good["server_key"]), write_tokens=["w"]
    )
    assert srv.location.startswith("grpc+tls://")
    card = make_card("tls", 1)
    evil_tls = ClientTLS.from_files(evil["ca"])
    with Client(srv.location, token="w", tls=evil_tls, retries=0, timeout=5) as c, pytest.raises(PeerError):
        c.publish(card)
    assert len(s) == 0
    with Client(srv.location, token="w", tls=ClientTLS.from_files(good["ca"])) as c:
        assert c.publish(card) == card.digest
        assert c.fetch("tls").digest == card.digest


def test_mtls_requires_client_certificate(make_store, make_server, pki):
    good, evil = pki
    s = make_store()
    srv = make_server(
        s,
        tls=ServerTLS.from_files(good["server_cert"], good["server_key"], good["ca"]),
        write_tokens=["w"],
    )
    card = make_card("mtls", 1)
    no_cert = ClientTLS.from_files(good["ca"])
    with (
        Client(srv.location, token="w", tls=no_cert, retries=0, timeout=5) as c,
        pytest.raises((PeerError, AuthError)),
    ):
        c.publish(card)
    wrong = ClientTLS.from_files(good["ca"], evil["client_cert"], evil["client_key"])
    with (
        Client(srv.location, token="w", tls=wrong, retries=0, timeout=5) as c,
        pytest.raises((PeerError, AuthError)),
    ):
        c.publish(card)
    assert len(s) == 0
    right = ClientTLS.from_files(good["ca"], good["client_cert"], good["client_key"])
    with Client(srv.location, token="w", tls=right) as c:
        assert c.publish(card) == card.digest


def test_publish_to_signed_node_checks_trust_before_storing(make_store, make_server):
    s = make_store(trust="signed")
    owner, other = keys.generate(), keys.generate()
    s.trust_add(keys.public_key_b64(owner.public_key()))
    srv = make_server(s, write_tokens=["w"])
    with Client(srv.location, token="w", retries=0) as c:
        with pytest.raises(TrustError, match="unsigned"):
            c.publish(make_card("p", 1))
        with pytest.raises(TrustError, match="does not trust"):
            c.publish(make_card("p", 1, key=other))
        assert c.publish(make_card("p", 1, key=owner))
        before = snapshot(s)
        s.trust_add(keys.public_key_b64(other.public_key()))
        with pytest.raises(TrustError, match="belongs to signer"):
            c.publish(make_card("p", 2, key=other))
        assert snapshot(s)[1:] == before[1:]
        # publishing the same card again is a no-op
        assert c.publish(make_card("p", 1, key=owner)) and snapshot(s)[1:] == before[1:]


def test_node_without_write_tokens_accepts_no_writes(make_store, make_server):
    s = make_store()
    srv = make_server(s)
    for token in (None, "anything"):
        with (
            Client(srv.location, token=token, retries=0) as c,
            pytest.raises(AuthError, match="accepts no writes"),
        ):
            c.publish(make_card("w", 1))
    assert len(s) == 0 and list(s.tmp_dir.iterdir()) == []


def test_advertised_size_beyond_the_local_limit_refused_before_any_byte(make_store):
    # A peer's own claim bounds a transfer; the client's limit bounds the claim.
    s = make_store()
    real = make_card("huge", 1, nbytes=2 << 20, modules=2)
    server = HostileServer(honest_entry(real), real.schema, real.batches)
    before = snapshot(s)
    with server, Client(server.uri, retries=0, timeout=10, max_card_bytes=1 << 20) as c:
        with pytest.raises(PeerError, match="more than this client's limit"):
            c.fetch("huge", 1, store=s)
        with pytest.raises(PeerError, match="more than this client's limit"):
            c.fetch("huge", 1)
    assert snapshot(s) == before
    s.close()


@pytest.mark.parametrize("version", ["99999999999999999999", "²", "-1", "0", "1.5"])
def test_absurd_versions_refused_with_a_reason_not_an_internal_error(make_store, make_server, version):
    s = make_store()
    srv = make_server(s, write_tokens=["w"])
    with flight.connect(("127.0.0.1", srv.port)) as raw:
        with pytest.raises(flight.FlightError, match="positive integer") as e:
            raw.get_flight_info(flight.FlightDescriptor.for_path("x", version))
        assert "internal" not in str(e.value).lower()
        opts = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer w")])
        body = json.dumps({"name": "x", "version": version}).encode()
        with pytest.raises(flight.FlightError, match="positive integer"):
            list(raw.do_action(flight.Action("delete", body), opts))
