"""Fixtures for federation tests: stores in tmp dirs and Flight servers on 127.0.0.1:0."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from loraflight.federation.server import CardServer
from loraflight.federation.store import Store


@pytest.fixture
def make_store(tmp_path) -> Iterator[Callable[..., Store]]:
    stores: list[Store] = []

    def make(name: str = "s", **kw) -> Store:
        s = Store(tmp_path / name, **kw)
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def make_server() -> Iterator[Callable[..., CardServer]]:
    servers: list[CardServer] = []

    def make(store: Store, **kw) -> CardServer:
        kw.setdefault("node_id", store.root.name)
        s = CardServer(store, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop(timeout=10)
