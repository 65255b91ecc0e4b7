"""Ed25519 keys for signing cards: file formats and signer ids (docs/format.md, "Keys").

Private key: PEM, PKCS#8, unencrypted, file mode 0600 (`<dir>/loraflight.key`).
Public key: PEM, SubjectPublicKeyInfo (`<dir>/loraflight.pub`).
Inside a card the public key travels as base64 of its 32 raw bytes (`signer_key`);
the signer id is the first 32 hex characters of sha256 over those raw bytes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from loraflight.errors import ConfigError
from loraflight.files import atomic_write

log = logging.getLogger(__name__)

PRIVATE_NAME = "loraflight.key"
PUBLIC_NAME = "loraflight.pub"


def public_key_b64(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_public_b64(b64: str) -> Ed25519PublicKey:
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def signer_id(pub_b64: str) -> str:
    """First 32 hex characters of sha256 over the raw 32-byte public key (docs/format.md)."""
    return hashlib.sha256(base64.b64decode(pub_b64, validate=True)).hexdigest()[:32]


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_keypair(
    directory: str | os.PathLike[str], key: Ed25519PrivateKey | None = None, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write a new key pair into `directory`; refuses to overwrite an existing key.

    Each file is written to a temporary name (the private one created 0600) and renamed, so a
    crash never leaves a half-written or briefly world-readable key.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / PRIVATE_NAME, d / PUBLIC_NAME
    if not overwrite and (priv.exists() or pub.exists()):
        raise ConfigError(f"{priv} already exists: refusing to overwrite a key; choose another directory")
    key = key or generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(priv, pem, mode=0o600)  # mkstemp creates the temp file 0600: never readable by others
    atomic_write(pub, pub_pem, mode=0o644)
    return priv, pub


MAX_KEY_FILE = 64 * 1024  # a PEM key is a few hundred bytes


def _read_key_file(p: Path, what: str) -> bytes:
    """A key file's bytes; refuses (without reading it all) anything far larger than a key."""
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {p}: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"{p} is larger than {MAX_KEY_FILE} bytes: not a {what} file")
    return data


def load_private(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    p = Path(path)
    if p.is_dir():
        p = p / PRIVATE_NAME
    data = _read_key_file(p, "private key")
    with contextlib.suppress(OSError):
        if os.stat(p).st_mode & 0o077:
            log.warning("private key %s is readable by other users; chmod 600 it", p)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{p} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a public key: PEM SubjectPublicKeyInfo, a private key file (its public half), or base64 raw."""
    p = Path(path)
    if p.is_dir():
        p = p / PUBLIC_NAME
    data = _read_key_file(p, "public key")
    if b"PRIVATE KEY" in data:
        return load_private(p).public_key()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = load_public_b64(data.decode().strip())
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not an Ed25519 public key (PEM or base64): {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{p} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_b64_from_file(path: str | os.PathLike[str]) -> str:
    return public_key_b64(load_public(path))


__all__ = [
    "generate",
    "load_private",
    "load_public",
    "load_public_b64",
    "public_b64_from_file",
    "public_key_b64",
    "signer_id",
    "write_keypair",
]
