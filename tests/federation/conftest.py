"""Fixtures for federation tests: stores in tmp dirs and Flight servers on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from loraflight.federation.server import CardServer
from loraflight.federation.store import Store
from loraflight.testing import server_factory, store_factory


@pytest.fixture
def make_store(tmp_path) -> Iterator[Callable[..., Store]]:
    with store_factory(tmp_path) as make:
        yield make


@pytest.fixture
def make_server() -> Iterator[Callable[..., CardServer]]:
    with server_factory() as make:
        yield make
