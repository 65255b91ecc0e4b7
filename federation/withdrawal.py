"""Withdrawals: signed records that take a card back across the fleet (docs/protocol.md,
"Withdrawals"). Pure: fields, canonical bytes, signing, verification and the trust rule;
no sockets, no files.

A withdrawal names `name@version` (it covers every digest of it), a reason, a time (UTC,
RFC 3339) and its signer. The signature is Ed25519 over a domain tag followed by the
canonical JSON of the other fields (sorted keys, no spaces, UTF-8), so it can never be
mistaken for a card signature, which signs a digest under another tag.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from loraflight.engine.card import check_name
from loraflight.engine.card.signing import verify_detached
from loraflight.errors import CardError, TrustError

from .trust import TrustedKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

WITHDRAW_DOMAIN = b"loraflight-withdraw-v1\x00"
MAX_REASON = 1024  # characters
MAX_RECORD_BYTES = 8 * 1024
FIELDS = ("name", "version", "reason", "time", "signer", "signer_key", "signature")


@dataclasses.dataclass(frozen=True)
class Withdrawal:
    """A withdrawal of every digest of `name@version`; see the module doc."""

    name: str
    version: int
    reason: str = ""
    time: str = ""
    signer: str | None = None
    signer_key: str | None = None
    signature: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def signed(self) -> bool:
        return self.signature is not None

    def message(self) -> bytes:
        """The bytes the signature signs: the domain tag and the canonical JSON of the fields."""
        body = {
            "name": self.name,
            "version": self.version,
            "reason": self.reason,
            "time": self.time,
            "signer": self.signer,
            "signer_key": self.signer_key,
        }
        return WITHDRAW_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, raw: object) -> Withdrawal:
        """Parse and check a record; every problem is reported together as a CardError."""
        if not isinstance(raw, Mapping):
            raise CardError("a withdrawal must be a JSON object with name, version, reason, time, signer")
        problems = []
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            problems.append(f"unknown fields {unknown} (known: {', '.join(FIELDS)})")
        name, version, reason = raw.get("name"), raw.get("version"), raw.get("reason", "")
        when = raw.get("time", "")
        try:
            check_name(name)  # type: ignore[arg-type]
        except (CardError, TypeError) as e:
            problems.append(f"'name': {e}")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**53:
            problems.append("'version' must be an integer, 1 or more (a withdrawal names one version)")
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            problems.append(f"'reason' must be a string of at most {MAX_REASON} characters")
        if not isinstance(when, str) or (when and _parse_time(when) is None):
            problems.append("'time' must be an RFC 3339 UTC time such as 2026-01-01T00:00:00Z")
        for f in ("signer", "signer_key", "signature"):
            v = raw.get(f)
            if v is not None and (not isinstance(v, str) or not v or len(v) > 256):
                problems.append(f"{f!r} must be a non-empty string or absent")
        if problems:
            raise CardError("invalid withdrawal: " + "; ".join(problems))
        return cls(
            name=str(name),
            version=int(version),  # type: ignore[arg-type]
            reason=str(reason),
            time=str(when),
            signer=raw.get("signer"),
            signer_key=raw.get("signer_key"),
            signature=raw.get("signature"),
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Withdrawal:
        if len(data) > MAX_RECORD_BYTES:
            raise CardError(f"a withdrawal is {len(data)} bytes; the limit is {MAX_RECORD_BYTES}")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CardError(f"a withdrawal is not UTF-8 JSON: {e}") from None
        return cls.from_dict(raw)

    def sign(self, key: Ed25519PrivateKey) -> Withdrawal:
        """This record signed by `key` (signer id and public key filled in)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from loraflight.engine.keys import public_key_b64, signer_id

        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"a withdrawal is signed with an Ed25519PrivateKey, got {type(key).__name__}")
        pub = public_key_b64(key.public_key())
        w = dataclasses.replace(self, signer=signer_id(pub), signer_key=pub, signature=None)
        sig = key.sign(w.message())
        return dataclasses.replace(w, signature=base64.b64encode(sig).decode())

    def verify(self) -> None:
        """Raise TrustError unless the record carries a valid signature by its signer key."""
        from loraflight.engine.keys import signer_id

        if self.signature is None or self.signer_key is None:
            raise TrustError(
                f"withdrawal of {self.ref} is unsigned; a withdrawal must be signed by a key trusted for "
                f"{self.name!r} ('loraflight withdraw ... --key KEY')"
            )
        try:
            sid = signer_id(self.signer_key)
        except (ValueError, TypeError) as e:
            raise TrustError(f"withdrawal of {self.ref}: signer key is malformed: {e}") from None
        if self.signer != sid:
            raise TrustError(
                f"withdrawal of {self.ref}: signer id {self.signer!r} does not match the signer key"
            )
        verify_detached(self.signer_key, self.signature, self.message(), what=f"withdrawal of {self.ref}")


@dataclasses.dataclass(frozen=True)
class WithdrawResult:
    """What honouring a withdrawal did on one store."""

    withdrawal: Withdrawal
    new: bool  # False: this store had recorded it already
    removed: tuple[str, ...] = ()  # digests of name@version deleted here

    def to_dict(self) -> dict[str, Any]:
        return {"withdrawn": self.withdrawal.ref, "new": self.new, "removed": list(self.removed)}


def _parse_time(text: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_withdrawal(
    name: str, version: int, key: Ed25519PrivateKey, *, reason: str = "", when: str | None = None
) -> Withdrawal:
    """A signed withdrawal of `name@version` (checked like a received one)."""
    w = Withdrawal.from_dict(
        {"name": name, "version": version, "reason": reason, "time": when or now_rfc3339()}
    )
    return w.sign(key)


def parse_ref(ref: str) -> tuple[str, int]:
    """`NAME@VERSION` -> (name, version); a withdrawal always names one version."""
    name, sep, version = ref.partition("@")
    if not sep or not version.isdigit() or int(version) < 1:
        raise CardError(f"{ref!r}: name a version to withdraw, as NAME@VERSION (e.g. skill@2)")
    check_name(name)
    return name, int(version)


def withdrawal_refusal(
    w: Withdrawal, *, owner: str | None, trusted: Mapping[str, TrustedKey], owners_count: bool = True
) -> str | None:
    """Why this node must not honour `w` (None: honour it). Pure.

    Honoured only with a valid signature by a key trusted for the name: a key of `trust.keys`
    (`trusted`; one scoped with name globs only for names they match), or, when `owners_count`
    (`trust.engine = "signed"`), the key that owns the name in this store (`owner`).
    """
    try:
        w.verify()
    except TrustError as e:
        return str(e)
    assert w.signer_key is not None
    tk = trusted.get(w.signer_key)
    if tk is not None and (not tk.names or tk.covers(w.name)):
        return None
    if owners_count and owner is not None and owner == w.signer_key:
        return None
    who = "the name's owner or " if owners_count else ""
    return (
        f"withdrawal of {w.ref} is signed by {w.signer}, which is not trusted for {w.name!r} here "
        f"(it must be {who}a key in trust.keys); refused"
    )


__all__ = [
    "MAX_REASON",
    "WITHDRAW_DOMAIN",
    "WithdrawResult",
    "Withdrawal",
    "new_withdrawal",
    "now_rfc3339",
    "parse_ref",
    "withdrawal_refusal",
]
