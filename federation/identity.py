"""The node's Ed25519 identity key, created on first start; the node id derives from it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from loraflight.engine import keys
from loraflight.errors import StoreError

NODE_ID_LEN = 16


@dataclasses.dataclass(frozen=True)
class NodeIdentity:
    private_key: Any  # Ed25519PrivateKey
    public_b64: str
    node_id: str
    directory: Path

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str]) -> NodeIdentity:
        """Load `<dir>/loraflight.key`, creating a new key pair on first start."""
        d = Path(directory)
        try:
            if not (d / keys.PRIVATE_NAME).exists():
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o700)
                keys.write_keypair(d)
        except OSError as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(
                f"cannot create the node identity key in {d}: {e.strerror or e}; "
                "check that the store directory is a writable directory"
            ) from None
        priv = keys.load_private(d / keys.PRIVATE_NAME)
        pub = keys.public_key_b64(priv.public_key())
        return cls(priv, pub, node_id_for(pub), d)


def node_id_for(public_b64: str) -> str:
    """The node id: the first 16 hex characters of the signer id of the identity key."""
    return keys.signer_id(public_b64)[:NODE_ID_LEN]


__all__ = ["NodeIdentity", "node_id_for"]
