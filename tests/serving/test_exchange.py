"""Flight do_exchange `embed`: record batches in, the same rows plus embeddings out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from loraflight.engine.authoring.serving_model import TINY_ID
from loraflight.federation.server import CardServer
from loraflight.federation.serving import ApiServer, make_exchange_handler
from loraflight.federation.store import Store

from .helpers import TOL, card, client, max_diff, serve, tiny, vec

OPS, DB = card("ops-runbook", 1, 1), card("db-tuning", 1, 2)


@pytest.fixture
def api() -> Iterator[ApiServer]:
    sm = tiny()
    sm.engine.load(OPS)
    sm.engine.load(DB)
    server = serve(sm)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def flight_server(api: ApiServer, tmp_path: Path) -> Iterator[CardServer]:
    store = Store(tmp_path / "store")
    srv = CardServer(store, exchange=make_exchange_handler(api.service))
    try:
        yield srv
    finally:
        srv.stop()
        store.close()


def exchange(srv: CardServer, model: str, table: pa.Table, max_chunksize: int = 250):
    with flight.connect(f"grpc://127.0.0.1:{srv.port}") as c:
        desc = flight.FlightDescriptor.for_command(json.dumps({"op": "embed", "model": model}).encode())
        writer, reader = c.do_exchange(desc)
        batches, metas = [], []
        with writer:
            writer.begin(table.schema)
            for b in table.to_batches(max_chunksize=max_chunksize):
                writer.write_batch(b)
                chunk = reader.read_chunk()  # batch by batch: each answer comes before the next is sent
                batches.append(chunk.data)
                metas.append(json.loads(chunk.app_metadata.to_pybytes()))
            writer.done_writing()
        return pa.Table.from_batches(batches), metas


def test_a_1000_row_table_in_1000_embeddings_out_equal_to_http(
    api: ApiServer, flight_server: CardServer
) -> None:
    texts = [f"row {i}: the pod restarts {'and the index grows ' * (i % 3)}" for i in range(1000)]
    table = pa.table({"id": pa.array(range(1000), pa.int64()), "text": texts})
    out, metas = exchange(flight_server, "ops-runbook", table)
    assert out.num_rows == 1000 and out.column("id").to_pylist() == list(range(1000))
    assert out.column("text").to_pylist() == texts
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert all(m == {"model": "ops-runbook@1", "digests": [OPS.digest]} for m in metas)
    got = np.asarray(out.column("embedding").combine_chunks().flatten()).reshape(1000, 64)
    http = client(api).embeddings.create(model="ops-runbook", input=texts)
    want = np.stack([vec(d) for d in http.data])
    assert max_diff(got, want) <= TOL


def test_a_per_row_adapter_column_mixes_adapters_in_one_batch(
    api: ApiServer, flight_server: CardServer
) -> None:
    texts = ["pods", "vacuum", "plain", "pods again"]
    table = pa.table({"text": texts, "adapter": ["ops-runbook", "db-tuning", None, DB.digest]})
    out, metas = exchange(flight_server, TINY_ID, table)
    assert metas[0]["digests"] == [OPS.digest, DB.digest, "base"]
    got = np.asarray(out.column("embedding").combine_chunks().flatten()).reshape(4, 64)
    c = client(api)
    for i, model in enumerate(["ops-runbook", "db-tuning", TINY_ID, "db-tuning"]):
        want = vec(c.embeddings.create(model=model, input=texts[i]).data[0])
        assert max_diff(got[i], want) <= TOL


def test_exchange_errors_are_clear(api: ApiServer, flight_server: CardServer, tmp_path: Path) -> None:
    table = pa.table({"text": ["x"]})
    with pytest.raises(flight.FlightError, match="does not exist on this node"):
        exchange(flight_server, "nope", table)
    with pytest.raises(flight.FlightError, match="string column 'text'"):
        exchange(flight_server, "ops-runbook", pa.table({"body": ["x"]}))
    store = Store(tmp_path / "plain")
    plain = CardServer(store)  # no engine: no exchange
    try:
        with pytest.raises(flight.FlightError, match="does not serve embeddings"):
            exchange(plain, "ops-runbook", table)
    finally:
        plain.stop()
        store.close()
    out, _ = exchange(flight_server, "ops-runbook", table)  # still serving
    assert out.num_rows == 1


def test_start_serving_gives_the_node_its_exchange_and_api(tmp_path: Path) -> None:
    from loraflight.federation.config import load_config
    from loraflight.federation.serving import start_serving

    sm = tiny()
    sm.engine.load(OPS)
    off = start_serving(model=sm, config=load_config(env={}))
    assert off.api is None  # api.listen empty: the exchange alone
    off.stop()
    serving = start_serving(model=sm, config=load_config(env={}, flags={"api.listen": "127.0.0.1:0"}))
    store = Store(tmp_path / "s")
    srv = CardServer(store, exchange=serving.exchange)
    try:
        out, _ = exchange(srv, "ops-runbook", pa.table({"text": ["pods"]}))
        assert serving.api is not None
        want = vec(client(serving.api).embeddings.create(model="ops-runbook", input="pods").data[0])
        got = np.asarray(out.column("embedding").combine_chunks().flatten())
        assert max_diff(got, want) <= TOL
    finally:
        srv.stop()
        serving.stop()
        store.close()
