"""Key files: a file far larger than a key is refused without being read whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflight.engine import keys
from loraflight.errors import ConfigError


@pytest.mark.parametrize("load", [keys.load_private, keys.load_public])
def test_huge_key_file_is_refused(tmp_path: Path, load) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * (1 << 20))
    with pytest.raises(ConfigError, match="larger than 65536 bytes"):
        load(big)


def test_key_files_round_trip(tmp_path: Path) -> None:
    priv, pub = keys.write_keypair(tmp_path)
    k = keys.load_private(priv)
    assert keys.public_b64_from_file(pub) == keys.public_key_b64(k.public_key())
    assert keys.public_b64_from_file(priv) == keys.public_key_b64(k.public_key())
