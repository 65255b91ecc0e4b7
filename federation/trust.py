"""Entry trust policy: what may enter a store (pure logic; the store persists keys and owners).

Rules (docs/protocol.md, "Trust"):
- every card must match its digest (checked by the store before this runs);
- `open`: nothing more;
- `signed`: a valid Ed25519 signature by a trusted key;
- under `signed`, a name belongs to the key that first signed it in this store (trust on
  first use): another key may add versions of that name only if it is trusted for that
  name explicitly (`trust add KEY --name GLOB`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping

from loraflight.engine.card import CardHeader
from loraflight.engine.card import verify_signature as card_signature
from loraflight.errors import ConfigError, TrustError

MODES = ("open", "signed")


@dataclasses.dataclass(frozen=True)
class TrustedKey:
    """A public key this store trusts: base64 raw Ed25519, its signer id, and name scope.

    `names` empty: the key may sign any name nobody owns yet. Globs in `names` also let it
    sign new versions of names another key owns.
    """

    key: str
    signer: str
    label: str = ""
    names: tuple[str, ...] = ()

    def covers(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.names)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"trust policy {mode!r} is not one of {', '.join(MODES)}")
    return mode


def verify_signature(header: CardHeader) -> None:
    """Check the header's signature against its digest and signer key (TrustError if bad or absent)."""
    card_signature(header, require_signed=True)


def check_entry(
    header: CardHeader,
    *,
    mode: str,
    trusted: Mapping[str, TrustedKey],
    owner: str | None,
) -> None:
    """Raise TrustError if `header` (whose digest already matched) may not enter the store.

    `trusted` maps base64 public keys to entries; `owner` is the key owning the name, if any.
    """
    check_mode(mode)
    if header.signature is not None:
        verify_signature(header)  # a bad signature is refused under every policy
    if mode == "open":
        return
    if header.signature is None or header.signer_key is None:
        raise TrustError(
            f"{header.ref} is unsigned, and this store only accepts cards signed by a trusted key "
            "(policy 'signed'); sign it with 'loraflight card sign'"
        )
    tk = trusted.get(header.signer_key)
    if tk is None:
        raise TrustError(
            f"{header.ref} is signed by {header.signer}, which this store does not trust; "
            "add its public key with 'loraflight trust add' if you trust it"
        )
    if owner is not None and owner != header.signer_key and not tk.covers(header.name):
        owner_id = trusted[owner].signer if owner in trusted else _sid(owner)
        raise TrustError(
            f"{header.ref}: the name {header.name!r} belongs to signer {owner_id} (first signer), but this "
            f"card is signed by {header.signer}; refused. Grant it with "
            f"'loraflight trust add KEY --name {header.name}' if that key may publish this name"
        )


def _sid(key_b64: str) -> str:
    from loraflight.engine.keys import signer_id

    try:
        return signer_id(key_b64)
    except Exception:
        return "?"


__all__ = ["MODES", "TrustedKey", "check_entry", "check_mode", "verify_signature"]
