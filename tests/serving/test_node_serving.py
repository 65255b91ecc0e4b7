"""A real `Node` serves what it hot-loads: the HTTP API and Flight `do_exchange` started by the
node itself from `engine.base_model` and `api.listen` (no serving object built by the test)."""

from __future__ import annotations

import json

import numpy as np
import openai
import pyarrow as pa
import pytest
from pyarrow import flight

from loraflight.errors import ConfigError
from loraflight.federation.client import Client
from loraflight.federation.node import Node
from loraflight.testing import node_config, wait_for

from .helpers import TOL, Reference, card, max_diff, vec

pytestmark = pytest.mark.slow
TOKEN = "node-serving-write-token"


def _node(tmp_path, base: str, **flags) -> Node:
    cfg = node_config(
        tmp_path / "store",
        "serve-test",
        **{
            "discovery.enabled": False,
            "engine.base_model": base,
            "trust.engine": "any",
            "tokens.write": [TOKEN],
            "api.listen": "127.0.0.1:0",
            **flags,
        },
    )
    return Node(cfg).start()


def test_node_serves_published_skill_over_http_and_exchange(tmp_path):
    ref = Reference()
    v1 = card("ops", 1, seed=3, description="runbook answers for disk and memory incidents")
    node = _node(tmp_path, "tiny:0")
    try:
        assert node.serving is not None and node.serving.api is not None
        with Client(node.uri, token=TOKEN) as c:
            c.publish(v1)
        wait_for(lambda: "ops" in node.loaded(), 30, "the published card to hot-load")
        api = openai.OpenAI(base_url=node.serving.api.url + "/v1", api_key="x", max_retries=0, timeout=60)
        ids = {m.id for m in api.models.list().data}
        assert {"ops", node.model.model_id} <= ids
        texts = ["the disk is full on node 3", "memory keeps growing"]
        raw = api.embeddings.with_raw_response.create(model="ops", input=texts)
        assert raw.headers["x-loraflight-digest"] == v1.digest
        got = raw.parse()
        assert got.model == "ops@1"
        for text, d in zip(texts, got.data, strict=True):
            assert max_diff(vec(d), ref(v1, text)) <= TOL
        base = api.embeddings.create(model=node.model.model_id, input=texts[0])
        assert max_diff(vec(base.data[0]), ref(None, texts[0])) <= TOL
        assert max_diff(vec(base.data[0]), vec(got.data[0])) > 1e-3  # the skill changes the answer

        # Flight do_exchange on the node's own Flight port, same numbers
        fc = flight.FlightClient(node.uri)
        try:
            desc = flight.FlightDescriptor.for_command(json.dumps({"op": "embed", "model": "ops"}).encode())
            writer, reader = fc.do_exchange(desc)
            table = pa.table({"text": texts})
            writer.begin(table.schema)
            writer.write_table(table)
            writer.done_writing()
            out = reader.read_all()
            writer.close()
        finally:
            fc.close()
        emb = np.asarray(out.column("embedding").to_pylist(), dtype=np.float32)
        for i, text in enumerate(texts):
            assert max_diff(emb[i], ref(v1, text)) <= TOL
    finally:
        node.stop()
    assert node.serving is None  # stopped with the node


def test_api_listen_without_a_model_is_a_config_error(tmp_path):
    cfg = node_config(
        tmp_path / "store", "serve-test", **{"discovery.enabled": False, "api.listen": "127.0.0.1:0"}
    )
    with pytest.raises(ConfigError, match=r"api\.listen needs a model"):
        Node(cfg).start()


def test_node_with_a_causal_base_serves_completions(tmp_path):
    node = _node(tmp_path, "tiny-chat-llama")
    try:
        assert node.serving is not None and node.serving.generation is not None
        api = openai.OpenAI(base_url=node.serving.api.url + "/v1", api_key="x", max_retries=0, timeout=120)
        base_id = api.models.list().data[0].id
        out = api.completions.create(model=base_id, prompt="the disk", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.completion_tokens <= 4
        again = api.completions.create(model=base_id, prompt="the disk", max_tokens=4, temperature=0)
        assert again.choices[0].text == out.choices[0].text  # greedy: the same answer
    finally:
        node.stop()
