"""Card signatures: Ed25519 over the digest (docs/format.md, "Signatures").

`verify_signature` is the one home of the signature rule; every caller (the card's `verify`,
the engine, the Flight client, a store's entry policy, a node's engine policy) uses it.
`sign_header` is its counterpart.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from loraflight.errors import TrustError

from .header import CardHeader

if TYPE_CHECKING:  # cryptography loads on first use: reading a card does not need it
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGN_DOMAIN = b"loraflight-sig-v1\x00"


def signed_message(digest: str) -> bytes:
    """The bytes a card signature signs: a domain tag and the raw 32-byte digest."""
    return SIGN_DOMAIN + bytes.fromhex(digest)


def sign_header(header: CardHeader, key: Ed25519PrivateKey) -> CardHeader:
    """`header` with a signature over its digest by `key`, and the signer's id and public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ..keys import public_key_b64, signer_id

    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"a card is signed with an Ed25519PrivateKey, got {type(key).__name__}")
    sig = key.sign(signed_message(header.digest))
    pub = public_key_b64(key.public_key())
    return dataclasses.replace(
        header, signature=base64.b64encode(sig).decode(), signer=signer_id(pub), signer_key=pub
    )


def verify_signature(
    header: CardHeader, trusted: Iterable[str] | None = None, *, require_signed: bool = False
) -> bool | None:
    """The signature rule, for a header whose digest is established. Raises TrustError.

    - a present signature must be valid: signer id matching the signer key, Ed25519 over the
      digest by that key (refused under every policy when bad);
    - with `trusted` (public keys, base64 raw Ed25519, or signer ids) or `require_signed`, a
      signature must be present; with `trusted` it must be by one of them.

    Returns the trust decision: True when `trusted` was given (and passed), None otherwise.
    """
    if header.signature is not None:
        _check_valid(header)
    elif require_signed or trusted is not None:
        raise TrustError(f"{header.ref} is unsigned, but a signature by a trusted key is required")
    if trusted is None:
        return None
    tset = trusted if isinstance(trusted, set | frozenset) else set(trusted)
    if header.signer_key not in tset and header.signer not in tset:
        raise TrustError(
            f"{header.ref} is signed by {header.signer}, which is not a trusted key; "
            "add its public key with 'loraflight trust add' if you trust it"
        )
    return True


def _check_valid(header: CardHeader) -> None:
    from ..keys import load_public_b64, signer_id

    assert header.signature is not None and header.signer_key is not None
    try:
        pub = load_public_b64(header.signer_key)
        sig = base64.b64decode(header.signature, validate=True)
    except (ValueError, TypeError) as e:
        raise TrustError(f"{header.ref}: signature or signer key is malformed: {e}") from None
    if header.signer != signer_id(header.signer_key):
        raise TrustError(f"{header.ref}: signer id {header.signer!r} does not match the signer key")
    if not _verify(pub, sig, signed_message(header.digest)):
        raise TrustError(f"{header.ref}: bad signature: it does not match the digest and signer key")


def _verify(pub: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    """The one Ed25519 check: True when `sig` signs `message` under `pub`."""
    from cryptography.exceptions import InvalidSignature

    try:
        pub.verify(sig, message)
    except InvalidSignature:
        return False
    return True


def verify_detached(signer_key_b64: str, signature_b64: str, message: bytes, *, what: str = "record") -> None:
    """Check an Ed25519 signature over `message` (domain-separated by the caller) by a base64 key.

    For signed records other than card headers (withdrawals). Raises TrustError saying what
    was wrong: a malformed key or signature, or a signature that does not match.
    """
    from ..keys import load_public_b64

    try:
        pub = load_public_b64(signer_key_b64)
        sig = base64.b64decode(signature_b64, validate=True)
    except (ValueError, TypeError) as e:
        raise TrustError(f"{what}: signature or signer key is malformed: {e}") from None
    if not _verify(pub, sig, message):
        raise TrustError(f"{what}: bad signature: it does not match the record and signer key")


check_signature = verify_signature  # the name `LoRACard.verify`'s callers have used


__all__ = [
    "SIGN_DOMAIN",
    "check_signature",
    "sign_header",
    "signed_message",
    "verify_detached",
    "verify_signature",
]
