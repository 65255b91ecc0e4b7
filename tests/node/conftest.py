"""Fixtures the node tests share: a fresh fleet id per test, and a signing key with its public half."""

from __future__ import annotations

import uuid

import pytest

from loraflight.engine import keys


@pytest.fixture
def fleet() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def signer() -> tuple[object, str]:
    k = keys.generate()
    return k, keys.public_key_b64(k.public_key())
