"""The withdrawal scenario of the network-namespace lab (registered in `netns_lab.SCENARIOS`,
run by tests/node/test_netns_withdraw.py inside `unshare -n -m`).

Three hosts with engines and a Flight server in the lab process (on the bridge, 10.77.0.254)
that ignores withdrawals: it keeps listing the withdrawn card to every host, as a peer from
before withdrawals would.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from typing import Any

import pyarrow.flight as flight

from loraflight.errors import ConflictError, TrustError
from loraflight.federation.client import Client
from loraflight.federation.protocol import ACTION_WITHDRAW, ACTION_WITHDRAWALS
from loraflight.federation.server import CardServer
from loraflight.federation.store import Store
from loraflight.federation.withdrawal import Withdrawal, new_withdrawal
from loraflight.testing import SUBNET, TOKEN, Lab, new_signer, tiny_card, wait_for

FLEET = "wd"
POLL = 3.0  # intervals.poll the hosts run with (health 0.5 s, probe 1 s: the lab's)
LIVE = 10 * POLL  # every liveness wait here is bounded at 10x the intervals configured
START = 120.0  # a node process starting (torch and the model load; not a liveness wait)
ROGUE_PORT = 8816
API_PORT = 8000  # each host's OpenAI-compatible serving API (api.listen)


class IgnoresWithdrawals(CardServer):
    """A Flight server that knows nothing of withdrawals and keeps listing what it holds."""

    def do_action(self, context: Any, action: Any) -> Any:
        if action.type in (ACTION_WITHDRAWALS, ACTION_WITHDRAW):
            raise flight.FlightServerError(f"[lf:card] unknown action {action.type!r}")
        return super().do_action(context, action)


def _engine_digest(lab: Lab, i: int, name: str) -> str | None:
    return ((lab.status(i) or {}).get("engine_digests") or {}).get(name)


def _api_digests(lab: Lab, i: int, name: str) -> tuple[str | None, str | None]:
    """(the digest /v1/models lists for `name`, the digest an embeddings request on it ran on)."""
    base = f"http://{SUBNET}.{i}:{API_PORT}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the bridge, never a proxy
    with opener.open(f"{base}/v1/models", timeout=10) as r:
        listed = {m["id"]: m.get("digest") for m in json.loads(r.read())["data"]}
    req = urllib.request.Request(
        f"{base}/v1/embeddings",
        data=json.dumps({"model": name, "input": ["is the rollback served?"]}).encode(),
        headers={"content-type": "application/json"},
    )
    with opener.open(req, timeout=30) as r:
        ran_on = r.headers.get("x-loraflight-digest")
    return listed.get(name), ran_on


def _rounds(lab: Lab, i: int) -> int:
    return int((lab.status(i) or {}).get("sync_rounds", 0))


def _log_size(lab: Lab, i: int) -> int:
    p = lab.workdir / f"h{i}" / "node.log"
    return p.stat().st_size if p.exists() else 0


def withdraw_fleet(lab: Lab) -> dict[str, Any]:
    """v1, v2 everywhere; h3 stopped; v2 withdrawn on h2; a rogue server keeps listing v2.
    After three sync rounds no host holds v2 and every engine runs v1; h3 drops v2 on restart
    and never fetches it again; untrusted withdrawals and a republish of v2 are refused."""
    key, pub = new_signer()
    stranger, _ = new_signer()
    v1, v2 = tiny_card("skill", 1, key=key), tiny_card("skill", 2, key=key, seed=1)
    hosts = (1, 2, 3)
    for i in hosts:
        lab.add_host(i)
    rogue_store = Store(lab.workdir / "rogue")
    rogue_store.add(v1, published=True)
    rogue_store.add(v2, published=True)
    rogue_uri = f"grpc://{SUBNET}.254:{ROGUE_PORT}"
    rogue = IgnoresWithdrawals(
        rogue_store, listen=rogue_uri, advertise=[rogue_uri], node_id="rogue", fleet_id=FLEET
    )

    def start(i: int) -> None:
        peers = [a for j in hosts if j != i for a in ("--peer", lab.uri(j))]
        lab.start_node(
            i, FLEET, "--trust-key", pub, "--no-discovery", *peers, "--peer", rogue_uri,
            "--intervals-poll", str(POLL), "--api-listen", f"0.0.0.0:{API_PORT}",
        )  # fmt: skip

    try:
        for i in hosts:
            start(i)
        ids = {i: lab.wait_up(i, START)["node_id"] for i in hosts}
        for i in hosts:
            want = {ids[j] for j in hosts if j != i} | {"rogue"}
            wait_for(lambda i=i, w=want: lab.live_peers(i) >= w, LIVE, f"h{i} to see its peers live")
        out: dict[str, Any] = {"ids": ids}

        # v1 and v2 published and loaded everywhere
        lab.publish(1, v1)
        lab.publish(1, v2)
        for i in hosts:
            wait_for(
                lambda i=i: _engine_digest(lab, i, "skill") == v2.digest, LIVE, f"skill@2 in h{i}'s engine"
            )
            assert _api_digests(lab, i, "skill") == (v2.digest, v2.digest), f"h{i}'s serving API"

        # h3 stopped; v2 withdrawn on h2
        assert lab.stop_node(3, signal.SIGTERM) == 0
        rounds = {i: _rounds(lab, i) for i in (1, 2)}
        log3 = _log_size(lab, 3)
        with Client(lab.uri(2), token=TOKEN, timeout=10.0) as c:
            res = c.withdraw(new_withdrawal("skill", 2, key, reason="regressed"))
        assert res["new"] and res["removed"] == [v2.digest], res

        # three sync rounds later: no host holds v2, every engine runs v1 (the rogue still lists v2)
        wait_for(
            lambda: all(_rounds(lab, i) >= rounds[i] + 3 for i in (1, 2)), LIVE, "three sync rounds on h1, h2"
        )
        with Client(rogue_uri, timeout=10.0) as c:
            assert "skill@2" in {e.ref for e in c.list()}, "the rogue server stopped listing v2"
        for i in (1, 2):
            assert not lab.has_card(i, "skill@2"), f"h{i} still holds skill@2"
            assert _engine_digest(lab, i, "skill") == v1.digest, f"h{i}'s engine does not run skill@1"
            assert [w["name"] for w in (lab.status(i) or {})["withdrawals"]] == ["skill"]

        # unsigned and stranger-signed withdrawals are refused and change nothing; so is a republish
        with Client(lab.uri(1), token=TOKEN, timeout=10.0) as c:
            for bad in (
                Withdrawal("skill", 1, "unsigned", "2026-01-01T00:00:00Z"),
                new_withdrawal("skill", 1, stranger, reason="not yours"),
            ):
                try:
                    c.withdraw(bad)
                except TrustError:
                    pass
                else:
                    raise AssertionError(f"h1 honoured an untrusted withdrawal: {bad}")
            try:
                c.publish(v2)
            except ConflictError as e:
                assert "withdrawn" in str(e), e
            else:
                raise AssertionError("h1 accepted a republish of the withdrawn skill@2")
            assert [w.ref for w in c.withdrawals()] == ["skill@2"]
        assert _engine_digest(lab, 1, "skill") == v1.digest and lab.has_card(1, "skill@1")

        # h3 restarts holding v2: it drops it, runs v1, and never fetches v2 again
        start(3)
        lab.wait_up(3, START)
        wait_for(
            lambda: not lab.has_card(3, "skill@2") and _engine_digest(lab, 3, "skill") == v1.digest,
            LIVE,
            "the restarted h3 to drop skill@2 and roll back to skill@1",
        )
        r3 = _rounds(lab, 3)
        wait_for(lambda: _rounds(lab, 3) >= r3 + 3, LIVE, "three sync rounds on the restarted h3")
        assert not lab.has_card(3, "skill@2") and _engine_digest(lab, 3, "skill") == v1.digest
        text = (lab.workdir / "h3" / "node.log").read_bytes()[log3:].decode(errors="replace")
        fetched = [ln for ln in text.splitlines() if "card skill@2 (" in ln and "added from" in ln]
        assert not fetched, f"h3 fetched skill@2 again: {fetched}"
        for i in hosts:
            assert _engine_digest(lab, i, "skill") == v1.digest
            assert _api_digests(lab, i, "skill") == (v1.digest, v1.digest), f"h{i}'s serving API"
        out["withdrawals_h3"] = (lab.status(3) or {}).get("withdrawals")
        return out
    finally:
        rogue.stop(10)
        rogue_store.close()


__all__ = ["LIVE", "POLL", "IgnoresWithdrawals", "withdraw_fleet"]
