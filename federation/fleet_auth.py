"""The fleet secret and the `hello` challenge that proves it (pure: no sockets, no threads).

A node that holds the fleet secret (`fleet_secret_file`) proves it to a peer it dials, and
the peer proves it back, with HMAC-SHA256 over fresh nonces (docs/protocol.md, "Hello"):

* the caller sends ``{"v": 1, "node_id", "peer", "target", "nonce", "time", "proof"}``:
  its node id, its own address, the address it dialled, 16 random bytes (hex), its clock
  (unix seconds) and ``HMAC(secret, "loraflight-hello-v1 client" | nonce | time | node_id |
  peer | target)``;
* the answer carries the answering node's id, fleet, epoch and protocol, its own nonce, and
  ``HMAC(secret, "loraflight-hello-v1 server" | caller nonce | its nonce | caller id | its id
  | target)``.

Each part is length-prefixed before it is hashed (no ambiguity between fields), proofs are
compared in constant time, nonces are fresh per call and a caller's nonce is accepted once
within the clock window (`ReplayCache`). Without a secret a node sends and answers empty
proofs: it stays compatible with peers that have one, which then treat it as unconfirmed.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from loraflight.errors import CardError, ConfigError

from .security import load_tokens

HELLO_VERSION = 1
NONCE_BYTES = 16
MIN_SECRET_CHARS = 16
CLOCK_WINDOW_S = 300.0  # a caller's clock may be this far off ours
MAX_ID_CHARS = 128
MAX_URI_CHARS = 512
_CLIENT = b"loraflight-hello-v1 client"
_SERVER = b"loraflight-hello-v1 server"


@dataclass(frozen=True)
class FleetSecret:
    """The shared secret of a fleet (never printed: its repr says only that it is set)."""

    value: bytes

    def __repr__(self) -> str:
        return "FleetSecret(<set>)"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> FleetSecret:
        """The first token of a token file (security.load_tokens rules), at least 16 chars."""
        tok = load_tokens(os.path.expanduser(str(path)))[0]
        if len(tok) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"fleet secret file {path}: the secret is {len(tok)} characters; use at least "
                f"{MIN_SECRET_CHARS} (e.g. `openssl rand -hex 32`)"
            )
        return cls(tok.encode())

    def mac(self, *parts: bytes | str) -> str:
        h = hmac.new(self.value, digestmod=hashlib.sha256)
        for p in parts:
            b = p.encode() if isinstance(p, str) else p
            h.update(len(b).to_bytes(4, "big"))
            h.update(b)
        return h.hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


@dataclass(frozen=True)
class HelloRequest:
    """A parsed `hello` body (bounded, checked)."""

    node_id: str
    peer: str
    target: str
    nonce: str
    time: int
    proof: str

    def proved(self, secret: FleetSecret | None, replay: ReplayCache, now: float | None = None) -> bool:
        """Whether the caller proved `secret` (fresh clock, unseen nonce, right HMAC)."""
        if secret is None or not self.proof:
            return False
        now = time.time() if now is None else now
        if abs(now - self.time) > CLOCK_WINDOW_S:
            return False
        want = secret.mac(_CLIENT, self.nonce, str(self.time), self.node_id, self.peer, self.target)
        if not hmac.compare_digest(want.encode(), self.proof.encode()):
            return False
        return replay.first(self.nonce, now)


def _text(body: dict[str, Any], key: str, limit: int, *, required: bool = True) -> str:
    v = body.get(key, "")
    if not isinstance(v, str) or len(v) > limit or (required and not v) or not v.isprintable():
        raise CardError(f"hello body: {key!r} must be a printable string of at most {limit} characters")
    return v


def _nonce(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) != 2 * NONCE_BYTES or any(c not in "0123456789abcdef" for c in v):
        raise CardError(f"{what}: the nonce must be {2 * NONCE_BYTES} lowercase hex digits")
    return v


def hello_request(
    secret: FleetSecret | None, *, node_id: str, peer: str, target: str, now: float | None = None
) -> tuple[dict[str, Any], str]:
    """(the body of a `hello` call, its nonce: keep it to check the answer)."""
    nonce = new_nonce()
    t = int(time.time() if now is None else now)
    proof = secret.mac(_CLIENT, nonce, str(t), node_id, peer, target) if secret is not None else ""
    body = {
        "v": HELLO_VERSION,
        "node_id": node_id,
        "peer": peer,
        "target": target,
        "nonce": nonce,
        "time": t,
        "proof": proof,
    }
    return body, nonce


def parse_hello_request(body: dict[str, Any]) -> HelloRequest:
    """Check a `hello` body; CardError saying what is wrong."""
    t = body.get("time")
    if not isinstance(t, int) or isinstance(t, bool) or abs(t) > 1 << 40:
        raise CardError("hello body: 'time' must be the caller's clock in unix seconds")
    proof = body.get("proof", "")
    if not isinstance(proof, str) or len(proof) not in (0, 64):
        raise CardError("hello body: 'proof' must be empty or 64 hex digits")
    return HelloRequest(
        node_id=_text(body, "node_id", MAX_ID_CHARS),
        peer=_text(body, "peer", MAX_URI_CHARS, required=False),
        target=_text(body, "target", MAX_URI_CHARS, required=False),
        nonce=_nonce(body.get("nonce"), "hello body"),
        time=t,
        proof=proof,
    )


def hello_answer(
    secret: FleetSecret | None, req: HelloRequest, *, node_id: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """The answer to `req`: `extra` (fleet, epoch, protocol...) plus this node's nonce and proof."""
    nonce = new_nonce()
    proof = secret.mac(_SERVER, req.nonce, nonce, req.node_id, node_id, req.target) if secret else ""
    return {**extra, "v": HELLO_VERSION, "node_id": node_id, "nonce": nonce, "proof": proof}


def answer_proved(
    secret: FleetSecret | None, answer: dict[str, Any], *, nonce: str, caller_id: str, target: str
) -> bool:
    """Whether a `hello` answer proves `secret` for the nonce we sent (False for any malformed one)."""
    if secret is None:
        return False
    node_id, theirs, proof = answer.get("node_id"), answer.get("nonce"), answer.get("proof")
    if not (isinstance(node_id, str) and isinstance(proof, str) and len(proof) == 64):
        return False
    try:
        theirs = _nonce(theirs, "hello answer")
    except CardError:
        return False
    want = secret.mac(_SERVER, nonce, theirs, caller_id, node_id, target)
    return hmac.compare_digest(want.encode(), proof.encode())


class ReplayCache:
    """Caller nonces seen within the clock window (bounded: the oldest go first)."""

    def __init__(self, max_entries: int = 8192, window: float = 2 * CLOCK_WINDOW_S) -> None:
        self.max_entries = max_entries
        self.window = window
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def first(self, nonce: str, now: float) -> bool:
        """True the first time `nonce` is seen (and remember it)."""
        with self._lock:
            while self._seen and (
                len(self._seen) >= self.max_entries or now - next(iter(self._seen.values())) > self.window
            ):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


__all__ = [
    "CLOCK_WINDOW_S",
    "HELLO_VERSION",
    "MIN_SECRET_CHARS",
    "FleetSecret",
    "HelloRequest",
    "ReplayCache",
    "answer_proved",
    "hello_answer",
    "hello_request",
    "new_nonce",
    "parse_hello_request",
]
