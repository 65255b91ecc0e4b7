"""Withdrawals: the pure record and trust rule, the store that keeps them for good, and the
wire (withdraw / withdrawals actions, sync) over loopback Flight."""

from __future__ import annotations

import dataclasses
import shutil

import pyarrow.flight as flight
import pytest

from loraflight.errors import AuthError, CardError, ConflictError, TrustError
from loraflight.federation.client import Client
from loraflight.federation.protocol import ACTION_WITHDRAWALS
from loraflight.federation.server import CardServer
from loraflight.federation.store import Store
from loraflight.federation.sync import SyncPolicy, plan_sync, sync
from loraflight.federation.trust import TrustedKey
from loraflight.federation.withdrawal import (
    WITHDRAW_DOMAIN,
    Withdrawal,
    new_withdrawal,
    parse_ref,
    withdrawal_refusal,
)
from loraflight.testing import make_card, new_signer

TOKEN = "withdraw-test-token-0123456789"


@pytest.fixture(scope="module")
def author():
    return new_signer()


@pytest.fixture(scope="module")
def stranger():
    return new_signer()


# ------------------------------------------------------------------ the record (pure)


def test_signed_record_verifies_and_its_bytes_are_domain_separated(author):
    key, pub = author
    w = new_withdrawal("skill", 2, key, reason="bad eval", when="2026-01-02T03:04:05Z")
    assert w.signer_key == pub and w.signer and w.signature
    w.verify()
    assert w.message().startswith(WITHDRAW_DOMAIN)
    assert Withdrawal.from_json(w.to_json()) == w  # the wire form round-trips exactly
    for field, value in (
        ("version", 3),
        ("reason", "other"),
        ("name", "skill2"),
        ("time", "2026-01-02T03:04:06Z"),
    ):
        with pytest.raises(TrustError, match="bad signature"):
            dataclasses.replace(w, **{field: value}).verify()


def test_unsigned_or_mismatched_signer_is_refused(author, stranger):
    key, _ = author
    with pytest.raises(TrustError, match="unsigned"):
        Withdrawal("skill", 2, "r", "2026-01-01T00:00:00Z").verify()
    w = new_withdrawal("skill", 2, key)
    with pytest.raises(TrustError, match="does not match the signer key"):
        dataclasses.replace(w, signer_key=stranger[1]).verify()
    with pytest.raises(TrustError, match="malformed"):
        dataclasses.replace(w, signature="not base64!").verify()


def test_invalid_records_name_every_problem():
    with pytest.raises(CardError) as e:
        Withdrawal.from_dict({"name": "", "version": 0, "time": "yesterday", "extra": 1})
    msg = str(e.value)
    for part in ("'name'", "'version'", "'time'", "unknown fields ['extra']"):
        assert part in msg, msg
    with pytest.raises(CardError, match="version"):
        Withdrawal.from_dict({"name": "skill", "version": True})
    with pytest.raises(CardError, match="not UTF-8 JSON"):
        Withdrawal.from_json(b"{nope")
    with pytest.raises(CardError, match="JSON object"):
        Withdrawal.from_json(b"[1]")


def test_parse_ref_needs_one_version():
    assert parse_ref("skill@3") == ("skill", 3)
    for bad in ("skill", "skill@latest", "skill@0", "skill@x"):
        with pytest.raises(CardError, match="NAME@VERSION"):
            parse_ref(bad)


def test_trust_rule_trusted_keys_and_the_names_owner(author, stranger):
    key, pub = author
    skey, spub = stranger
    w = new_withdrawal("skill", 2, key)
    tk = {pub: TrustedKey(pub, w.signer or "", "config")}
    assert withdrawal_refusal(w, owner=None, trusted=tk) is None
    # the owner counts only when owners count (trust.engine = "signed")
    assert withdrawal_refusal(w, owner=pub, trusted={}) is None
    why = withdrawal_refusal(w, owner=pub, trusted={}, owners_count=False)
    assert why is not None and "not trusted for 'skill'" in why
    # a stranger, even one that signed a card of another name, is refused
    s = new_withdrawal("skill", 2, skey)
    why = withdrawal_refusal(s, owner=pub, trusted=tk)
    assert why is not None and s.signer in why and "refused" in why
    # a trusted key scoped to other names does not cover this one
    scoped = {spub: TrustedKey(spub, s.signer or "", "", ("other-*",))}
    assert withdrawal_refusal(s, owner=pub, trusted=scoped) is not None
    assert withdrawal_refusal(s, owner=pub, trusted={spub: TrustedKey(spub, "", "", ("sk*",))}) is None
    # unsigned: refused whoever owns the name
    assert "unsigned" in (withdrawal_refusal(Withdrawal("skill", 2), owner=pub, trusted=tk) or "")


# ------------------------------------------------------------------ the store


def _two_versions(store: Store, key):
    v1 = store.add(make_card("skill", 1, key=key), published=True)
    v2 = store.add(make_card("skill", 2, key=key), published=True)
    return v1, v2


def test_store_honours_keeps_and_refuses_for_good(make_store, author, tmp_path):
    key, _pub = author
    s = make_store("a")
    v1, v2 = _two_versions(s, key)
    removed = []
    s.subscribe(lambda ev, e: removed.append((ev, e.digest)))
    epoch = s.epoch
    res = s.withdraw(new_withdrawal("skill", 2, key, reason="regression"))
    assert res.new and res.removed == (v2.digest,)
    assert removed == [("removed", v2.digest)]
    assert s.epoch > epoch
    assert not s.path_of(v2.digest).exists() and v2.digest not in s
    assert v1.digest in s
    # the same record again: a no-op
    assert not s.withdraw(s.withdrawals()[0]).new
    # never stored again: the same card, or another digest under that name@version
    for card in (make_card("skill", 2, key=key), make_card("skill", 2, key=key, seed=9)):
        with pytest.raises(ConflictError, match=r"skill@2 was withdrawn .*regression.*for good"):
            s.add(card)
    s.add(make_card("skill", 3, key=key))  # the fix, as a new version
    s.close()
    # kept for good: a reopened store still knows and refuses
    s2 = Store(tmp_path / "a")
    try:
        assert [w.ref for w in s2.withdrawals()] == ["skill@2"]
        with pytest.raises(ConflictError, match="withdrawn"):
            s2.add(make_card("skill", 2, key=key))
    finally:
        s2.close()


def test_withdrawal_without_the_card_is_kept_and_bumps_the_epoch(make_store, author):
    key, _ = author
    s = make_store("a", trust="open")
    e0 = s.epoch
    s.trust_add(author[1], label="config")
    res = s.withdraw(new_withdrawal("later", 1, key))
    assert res.new and res.removed == () and s.epoch == e0 + 1
    with pytest.raises(ConflictError, match="withdrawn"):
        s.add(make_card("later", 1, key=key))


def test_untrusted_withdrawals_change_nothing(make_store, author, stranger):
    key, pub = author
    s = make_store("a")
    _v1, v2 = _two_versions(s, key)
    epoch = s.epoch
    for w in (new_withdrawal("skill", 2, stranger[0]), Withdrawal("skill", 2, "no", "2026-01-01T00:00:00Z")):
        with pytest.raises(TrustError):
            s.withdraw(w)
    assert s.epoch == epoch and v2.digest in s and s.withdrawals() == []
    # the owner counts only when the store says so (a node with trust.engine = "any")
    s.withdraw_owners = False
    with pytest.raises(TrustError, match="not trusted"):
        s.withdraw(new_withdrawal("skill", 2, key))
    s.trust_add(pub, label="config")
    assert s.withdraw(new_withdrawal("skill", 2, key)).new


def test_a_card_file_left_by_a_crash_after_the_withdrawal_is_removed_on_open(make_store, author, tmp_path):
    key, _ = author
    s = make_store("a")
    _v1, v2 = _two_versions(s, key)
    saved = tmp_path / "saved.lora.arrow"
    shutil.copyfile(s.path_of(v2.digest), saved)
    s.withdraw(new_withdrawal("skill", 2, key))
    shutil.copyfile(saved, s.path_of(v2.digest))  # as if the unlink had not happened
    s.close()
    s2 = Store(tmp_path / "a")
    try:
        assert v2.digest not in s2 and not s2.path_of(v2.digest).exists()
    finally:
        s2.close()


def test_plan_sync_skips_withdrawn_refs(make_store, author):
    key, _ = author
    s = make_store("a")
    v1, v2 = _two_versions(s, key)
    plan = plan_sync([], {"grpc://p:1": [v1, v2]}, SyncPolicy(), withdrawn={("skill", 2)})
    assert [f.ref for f in plan] == ["skill@1"]
    assert plan_sync([], {"grpc://p:1": [v2]}, SyncPolicy(), withdrawn={("skill", 2)}) == []


# ------------------------------------------------------------------ the wire


class OldServer(CardServer):
    """A peer from before withdrawals: it answers `withdrawals` as an unknown action and
    keeps listing what it holds."""

    def do_action(self, context, action):
        if action.type == ACTION_WITHDRAWALS:
            raise flight.FlightServerError(f"[lf:card] unknown action {action.type!r}")
        return super().do_action(context, action)


def test_withdraw_over_flight_and_sync_to_a_peer_despite_an_old_server(
    make_store, make_server, author, stranger
):
    key, _ = author
    a, b, old = make_store("a"), make_store("b"), make_store("old")
    for st in (a, b, old):
        _two_versions(st, key)
    srv_a = make_server(a, write_tokens=[TOKEN])
    srv_old = OldServer(old, listen="grpc://127.0.0.1:0", node_id="old")
    try:
        with Client(srv_a.location, token=TOKEN) as c:
            with pytest.raises(TrustError):
                c.withdraw(Withdrawal("skill", 2, "", "2026-01-01T00:00:00Z"))
            with pytest.raises(TrustError, match="not trusted"):
                c.withdraw("skill@2", stranger[0])
            assert [e.ref for e in c.list()] == ["skill@1", "skill@2"]
            out = c.withdraw("skill@2", key, reason="bad")
            assert out["withdrawn"] == "skill@2" and out["new"] and len(out["removed"]) == 1
            assert [w.ref for w in c.withdrawals()] == ["skill@2"]
            assert c.withdrawals()[0].reason == "bad"
            with pytest.raises(ConflictError, match="withdrawn"):
                c.publish(make_card("skill", 2, key=key))
        with Client(srv_a.location) as c, pytest.raises(AuthError):
            c.withdraw("skill@2", key)
        with Client(srv_old.location) as c:
            assert c.withdrawals() == []  # an old peer lists none, and that is no error
            with pytest.raises(CardError, match="unknown action"):
                c.withdrawals(strict=True)
        # b syncs from the old peer (still listing v2) and from a: it honours a's withdrawal
        # and fetches nothing withdrawn, whoever lists it
        c_digest = b.find("skill", 2).digest
        report = sync([srv_old.location, srv_a.location], None, b)
        assert report.withdrawn == ["skill@2"] and report.fetched == []
        assert c_digest not in b and [w.ref for w in b.withdrawals()] == ["skill@2"]
        b.add(make_card("other", 1, key=key))
        for _ in range(3):
            assert sync([srv_old.location, srv_a.location], None, b).fetched == []
        assert [e.ref for e in b.list()] == ["other@1", "skill@1"]
    finally:
        srv_old.stop(timeout=10)
