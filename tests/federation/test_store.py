import os

import pytest

from loraflight.engine import keys
from loraflight.engine.card import LoRACard
from loraflight.errors import CardError, CardNotFound, ConflictError, TrustError
from loraflight.federation.store import Store
from loraflight.testing import make_card


def test_add_get_find_list_epoch(make_store):
    s = make_store()
    assert s.epoch == 0 and len(s) == 0
    events = []
    s.subscribe(lambda ev, e: events.append((ev, e.ref)))
    c1, c2 = make_card("a", 1), make_card("a", 2, tags=("x",))
    e1 = s.add(c1, published=True)
    assert e1.ref == "a@1" and e1.published and s.epoch == 1
    s.add(c2, source="grpc://peer:1")
    assert s.epoch == 2
    assert s.find("a").version == 2 and s.find("a", 1).digest == c1.digest
    assert [e.ref for e in s.list(tags=("x",))] == ["a@2"]
    assert [e.ref for e in s.list(since=1)] == ["a@2"]
    assert [e.ref for e in s.list(name="a*", limit=1)] == ["a@1"]
    got = s.get(c1.digest)
    assert got.path == s.path_of(c1.digest) and got.verify().digest == c1.digest
    # adding the same digest again changes nothing but flags
    s.add(c2, pinned=True)
    assert s.epoch == 2 and s.entry(c2.digest).pinned
    s.remove(c1.digest)
    assert s.epoch == 3 and c1.digest not in s and not s.path_of(c1.digest).exists()
    assert events == [("added", "a@1"), ("added", "a@2"), ("removed", "a@1")]
    with pytest.raises(CardNotFound):
        s.find("zzz")


def test_epoch_persists_and_only_grows(tmp_path):
    with Store(tmp_path / "s") as s:
        s.add(make_card("a", 1))
        d = s.add(make_card("b", 1)).digest
        s.remove(d)
        e = s.epoch
    with Store(tmp_path / "s") as s:
        assert s.epoch == e == 3


def test_conflict_same_name_version_other_digest(make_store):
    s = make_store()
    s.add(make_card("a", 1, seed=1))
    other = make_card("a", 1, seed=2)
    with pytest.raises(ConflictError, match="a@1 already exists"):
        s.add(other)
    assert len(s) == 1 and not s.path_of(other.digest).exists()
    assert list(s.tmp_dir.iterdir()) == []


def test_tampered_card_refused(make_store, tmp_path):
    s = make_store()
    card = make_card("a", 1)
    p = tmp_path / "a.lora.arrow"
    card.write(p)
    raw = bytearray(p.read_bytes())
    # flip a byte in the middle of the tensor data
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CardError):
        s.add(p)
    assert len(s) == 0 and list(s.cards_dir.iterdir()) == []


def test_signed_policy_and_name_ownership(make_store):
    s = make_store(trust="signed")
    k1, k2 = keys.generate(), keys.generate()
    pub1, pub2 = keys.public_key_b64(k1.public_key()), keys.public_key_b64(k2.public_key())
    with pytest.raises(TrustError, match="unsigned"):
        s.add(make_card("a", 1))
    with pytest.raises(TrustError, match="does not trust"):
        s.add(make_card("a", 1, key=k1))
    s.trust_add(pub1, label="alice")
    s.trust_add(pub2, label="bob")
    s.add(make_card("a", 1, key=k1))
    assert s.owner("a") == pub1
    with pytest.raises(TrustError, match="belongs to signer"):
        s.add(make_card("a", 2, key=k2))
    assert s.find("a").version == 1
    s.trust_add(pub2, label="bob", names=("a",))  # explicitly granted
    assert s.add(make_card("a", 2, key=k2)).version == 2
    assert s.trust_remove(keys.signer_id(pub2))
    with pytest.raises(TrustError):
        s.add(make_card("b", 1, key=k2))


def test_bad_signature_refused_even_when_open(make_store):
    import dataclasses

    s = make_store()
    k = keys.generate()
    card = make_card("a", 1, key=k)
    forged = card.with_header(
        dataclasses.replace(card.header, signature=make_card("a", 1, seed=9, key=k).header.signature)
    )
    with pytest.raises(TrustError):
        s.add(forged)
    assert len(s) == 0


def test_lru_eviction_spares_pinned_published_local(make_store):
    s = make_store(max_bytes=10**9)
    local = s.add(make_card("local", 1, nbytes=100_000))
    pinned = s.add(make_card("pinned", 1, nbytes=100_000), source="grpc://p:1", pinned=True)
    old = s.add(make_card("old", 1, nbytes=100_000), source="grpc://p:1")
    new = s.add(make_card("new", 1, nbytes=100_000), source="grpc://p:1")
    s.touch(new.digest)
    s.max_bytes = local.size + pinned.size + new.size + 10
    removed = s.evict()
    assert [e.ref for e in removed] == ["old@1"]
    assert old.digest not in s and {local.digest, pinned.digest, new.digest} <= {e.digest for e in s.list()}
    s.max_bytes = 1
    s.evict()
    assert {e.ref for e in s.list()} == {"local@1", "pinned@1"}
    # a fetched card larger than the cap is kept when added (its own add does not evict it)
    big = s.add(make_card("big", 1, nbytes=200_000), source="grpc://p:1")
    assert big.digest in s


def test_staged_abort_leaves_nothing(make_store):
    s = make_store()
    card = make_card("a", 1, nbytes=1 << 20, modules=4)
    with pytest.raises(RuntimeError), s.stage(card.schema, rows=len(card)) as st:
        st.write_batch(card.batches[0])
        raise RuntimeError("peer died")
    assert list(s.tmp_dir.iterdir()) == [] and len(s) == 0
    with s.stage(card.schema, rows=len(card)) as st:
        for b in card.batches:
            st.write_batch(b)
        e = st.commit(source="grpc://x:1")
    assert e.digest == card.digest and s.get(card.digest).verify()


def test_staged_truncated_or_oversized_refused(make_store):
    s = make_store()
    card = make_card("a", 1, nbytes=9 << 20, modules=8)
    assert len(card.batches) > 1
    with s.stage(card.schema, rows=len(card)) as st:
        st.write_batch(card.batches[0])
        with pytest.raises(CardError, match="truncated"):
            st.commit()
    with (
        pytest.raises(CardError, match="more than"),
        s.stage(card.schema, rows=len(card), max_bytes=1000) as st,
    ):
        st.write_batch(card.batches[0])
    assert len(s) == 0 and list(s.tmp_dir.iterdir()) == []


def test_repair_after_crash_states(tmp_path):
    root = tmp_path / "s"
    with Store(root) as s:
        kept = s.add(make_card("kept", 1))
        gone = s.add(make_card("gone", 1))
    orphan = make_card("orphan", 1)
    bad = make_card("bad", 1)
    (root / "tmp" / "x.part").write_bytes(b"partial")
    orphan.write(root / "cards" / f"{orphan.digest}.lora.arrow")
    (root / "cards" / f"{bad.digest}.lora.arrow").write_bytes(bad.to_bytes()[:500])  # truncated
    os.unlink(root / "cards" / f"{gone.digest}.lora.arrow")
    with Store(root) as s:
        refs = {e.ref for e in s.list()}
        assert refs == {"kept@1", "orphan@1"}
        assert s.entry(orphan.digest).source == "recovered"
        assert list((root / "tmp").iterdir()) == []
        assert not (root / "cards" / f"{bad.digest}.lora.arrow").exists()
        for e in s.list():
            s.get(e.digest).verify()
        assert kept.digest in s


def test_names_escaping_store_refused(make_store):
    s = make_store()
    for bad in ("../evil", "a/b", "..", ".hidden", "a\x00b"):
        with pytest.raises(CardError):
            make_card(bad)
    with pytest.raises(CardError):
        s.path_of("../../etc/passwd")
    assert list(s.cards_dir.iterdir()) == []


def test_open_card_from_path(make_store, tmp_path):
    s = make_store()
    c = make_card("p", 1)
    c.write(tmp_path / "p.lora.arrow")
    e = s.add(tmp_path / "p.lora.arrow")
    assert LoRACard.open(s.path_of(e.digest)).digest == c.digest
